"""The `kleinserve` command.

    kleinserve generate "a red fox" --size 512x512 --seed 7 -o fox.png
    kleinserve generate "make it blue" --ref fox.png --model DIR
    kleinserve model create-tiny DIR
    kleinserve model info DIR

Errors kleinserve expects (bad input, unusable model) print one line and exit 2; only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kleinserve.errors import InvalidInput, KleinError

DEFAULT_MODEL = os.environ.get("KLEINSERVE_MODEL", "tiny-random")


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1024x768") from None
    return width, height


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=DEFAULT_MODEL, help="directory, BFL .safetensors, repo id or tiny-random"
    )
    group.add_argument("--components", help="with a BFL single file: directory or repo id of the other parts")
    group.add_argument("--download", action="store_true", help="fetch a repo id from the Hugging Face Hub")
    group.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument(
        "--dtype", help="compute dtype: float32, bfloat16, float16 (default: cuda bf16, cpu fp32)"
    )
    group.add_argument("--quantize", choices=["int8"], help="CPU: int8 dynamic quantization (faster, drifts)")
    group.add_argument("--offload", action="store_true", help="CUDA: keep idle components on the CPU")
    group.add_argument("--memory-budget", type=float, metavar="GIB", help="RAM the weights may use")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kleinserve", description="FLUX.2 [klein] image generation")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate or edit images")
    generate.add_argument("prompt")
    generate.add_argument("--ref", action="append", default=[], type=Path, help="reference image (up to 4)")
    generate.add_argument(
        "--size", type=_size, help="WIDTHxHEIGHT (default: first reference's size, else 1024)"
    )
    generate.add_argument("--seed", type=int)
    generate.add_argument("--steps", type=int)
    generate.add_argument("--guidance", type=float, help="base variants only")
    generate.add_argument("--negative-prompt", default="")
    generate.add_argument("--n", type=int, default=1, help="number of images (1-4), seeds seed..seed+n-1")
    generate.add_argument("-o", "--output", type=Path, default=Path("kleinserve.png"), help="output file")
    _add_model_options(generate)

    model = commands.add_parser("model", help="model files").add_subparsers(
        dest="model_command", required=True
    )
    tiny = model.add_parser("create-tiny", help="write the tiny random model in the diffusers layout")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--base", action="store_true", help="an undistilled (CFG) variant")
    tiny.add_argument("--seed", type=int, default=0)
    info = model.add_parser("info", help="variant, parameters, dtype and memory of a model")
    info.add_argument("model")
    info.add_argument("--components")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.model_command == "create-tiny":
            from kleinserve.engine.tiny import create_tiny

            print(create_tiny(args.directory, seed=args.seed, distilled=not args.base))
            return 0
        return _info(args)
    except KleinError as exc:
        print(f"kleinserve: error: {exc.message}", file=sys.stderr)
        return 2


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    from kleinserve.engine import load_pipeline
    from kleinserve.engine.loading import inspect_source, resolve_source
    from kleinserve.engine.pipeline import resolve_request
    from kleinserve.types import GenerateRequest, ImageFormat

    references = []
    for path in args.ref:
        try:
            references.append(Image.open(path))
        except (OSError, UnidentifiedImageError) as exc:
            raise InvalidInput(f"{path}: not a readable image ({exc})", param="ref") from None
    suffix = args.output.suffix.lower().lstrip(".")
    formats = {
        "png": ImageFormat.PNG,
        "jpg": ImageFormat.JPEG,
        "jpeg": ImageFormat.JPEG,
        "webp": ImageFormat.WEBP,
    }
    if suffix not in formats:
        raise InvalidInput(f"{args.output}: unknown image type", param="output", allowed=".png, .jpg, .webp")
    width, height = args.size or (None, None)
    request = GenerateRequest(
        prompt=args.prompt,
        width=width,
        height=height,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        num_images=args.n,
        reference_images=tuple(references),
        negative_prompt=args.negative_prompt,
        output_format=formats[suffix],
    )
    # Check the request against the model's configs before spending minutes loading the weights.
    resolve_request(request, inspect_source(resolve_source(args.model, components=args.components)).spec)
    pipeline = load_pipeline(
        args.model,
        components=args.components,
        download=args.download,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        offload=args.offload,
        memory_budget_gib=args.memory_budget,
    )
    resolved = pipeline.resolve(request)
    with tqdm(total=resolved.steps, desc="denoising", unit="step", file=sys.stderr) as bar:
        result = pipeline.generate_batch([resolved], on_step=lambda _: bar.update())[0]
    for path, image in zip(_output_paths(args.output, len(result.images)), result.images, strict=True):
        path.write_bytes(image.encode(request.output_format))
        print(f"{path}\tseed={image.seed}\t{result.width}x{result.height}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from kleinserve.engine.loading import inspect_source, resolve_source

    info = inspect_source(resolve_source(args.model, components=args.components))
    gib = 1 << 30
    lines = {
        "variant": info.spec.name,
        "distilled": info.spec.distilled,
        "default steps": info.spec.default_steps,
        "default guidance": info.spec.default_guidance,
        "transformer parameters": f"{info.transformer_parameters:,}",
        "text encoder parameters (layers used)": f"{info.text_encoder_parameters:,}",
        "vae parameters": f"{info.vae_parameters:,}",
        "stored dtypes": ", ".join(f"{c} {d}" for c, d in info.stored_dtypes.items()),
        "memory, as stored": f"{info.stored_bytes / gib:.2f} GiB",
        "memory, fp32 compute": f"{info.fp32_bytes / gib:.2f} GiB",
    }
    for key, value in lines.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
