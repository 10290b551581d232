"""The `kleinserve` command.

    kleinserve generate "a red fox" --size 512x512 --seed 7 -o fox.png
    kleinserve generate "make it blue" --ref fox.png --model DIR
    kleinserve model create-tiny DIR
    kleinserve model info DIR
    kleinserve model prepare DIR
    kleinserve toy train --out DIR
    kleinserve toy eval
    kleinserve toy grid --out docs/toy-grid.png
    kleinserve serve --model DIR --port 8000
    kleinserve api --database-url postgresql://... --media-url s3://bucket/prefix --port 8000
    kleinserve worker --database-url postgresql://... --media-url s3://bucket/prefix --model DIR
    kleinserve keys create --name alice
    kleinserve usage --key alice --since 2026-01-01

Errors kleinserve expects (bad input, unusable model) print one line and exit 2; only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kleinserve import cli_options as options
from kleinserve.errors import InvalidInput, KleinError, ModelLoadError

if TYPE_CHECKING:
    from kleinserve.engine.loading import ModelSource

# `kleinserve toy train --stage`: toy/train.py's STAGES (importing it here would load torch for every command)
TOY_STAGES = ["all", "transformer", "decoder", "refine", "inpaint", "shapes", "pairs"]


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1024x768") from None
    return width, height


def _date(text: str) -> float:
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%d"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kleinserve", description="FLUX.2 [klein] image generation")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate or edit images")
    generate.add_argument("prompt")
    generate.add_argument("--ref", action="append", default=[], type=Path, help="reference image (up to 4)")
    generate.add_argument(
        "--size",
        type=_size,
        help="WIDTHxHEIGHT (default: the first reference's size, else the model's own square: 1024x1024 for "
        "klein, 256x256 for the toy; `model info` shows it)",
    )
    generate.add_argument("--seed", type=int)
    generate.add_argument("--steps", type=int)
    generate.add_argument("--guidance", type=float, help="base variants only")
    generate.add_argument("--negative-prompt", default="")
    generate.add_argument("--n", type=int, default=1, help="number of images (1-4), seeds seed..seed+n-1")
    generate.add_argument("-o", "--output", type=Path, default=Path("kleinserve.png"), help="output file")
    options.add_model_options(generate)

    model = commands.add_parser("model", help="model files").add_subparsers(
        dest="model_command", required=True
    )
    tiny = model.add_parser("create-tiny", help="write the tiny random model in the diffusers layout")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--base", action="store_true", help="an undistilled (CFG) variant")
    tiny.add_argument("--seed", type=int, default=0)
    info = model.add_parser("info", help="variant, parameters, dtype and memory of a model")
    info.add_argument("model")
    options.add_source_options(info)
    prepare = model.add_parser(
        "prepare",
        help="compute the int8 weights a --quantize int8 load reads, and keep them beside the model",
    )
    prepare.add_argument("model")
    options.add_source_options(prepare)

    toy = commands.add_parser("toy", help="the embedded toy model").add_subparsers(
        dest="toy_command", required=True
    )
    train = toy.add_parser(
        "train", help="train the toy model from scratch (deterministic, ~165 min on 2 cores)"
    )
    train.add_argument("--out", type=Path, required=True, help="directory to write (diffusers layout)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--stage",
        choices=TOY_STAGES,
        default="all",
        help="continue the model of --from (written with 0 steps of this stage and the later ones) from "
        "stage 3 (transformer), 4 (decoder), 4b (refine: the transformer on its own samples), 5 (inpaint) or "
        "6 (shapes: the transformer mostly on captions) or 7 (pairs: captions in pairs of shapes)",
    )
    train.add_argument("--from", dest="source", type=Path, help="with --stage: the model to continue")
    train.add_argument("--inpaint-steps", type=int, help="stage 5's steps (default: the committed weights')")
    evaluate = toy.add_parser("eval", help="score colour, position, shape and edits on held-out captions")
    evaluate.add_argument("--model", default="flux-2-klein-toy", help="the toy model's directory or name")
    evaluate.add_argument("--count", type=int, default=144, help="held-out captions to render")
    evaluate.add_argument("--edits", type=int, default=24, help="recolouring edits to render")
    evaluate.add_argument("--inpaints", type=int, default=12, help="masked edits to render")
    grid = toy.add_parser("grid", help="one PNG of held-out captions as the toy model draws them")
    grid.add_argument("--model", default="flux-2-klein-toy", help="the toy model's directory or name")
    grid.add_argument("--out", type=Path, default=Path("docs/toy-grid.png"), help="the PNG to write")
    grid.add_argument(
        "--side", type=int, action="append", help="image side in px, repeatable (default: 128 and 256)"
    )
    grid.add_argument("--count", type=int, default=12, help="held-out captions to draw")

    serve = commands.add_parser("serve", help="the HTTP server (OpenAI, Cloudflare, Vercel dialects)")
    options.add_server_options(serve)
    serve.add_argument("--max-batch", type=int, default=4, help="images per engine call")
    options.add_model_options(serve)

    api = commands.add_parser("api", help="scaled out: a stateless API process (no model loaded)")
    options.add_server_options(api)
    options.add_scale_options(api)
    api.add_argument(
        "--model", default=options.DEFAULT_MODEL, help="the model the workers serve (its configs only)"
    )
    options.add_source_options(api)

    worker = commands.add_parser("worker", help="scaled out: one engine that claims jobs from the database")
    options.add_data_dir(worker)
    options.add_scale_options(worker)
    worker.add_argument("--max-batch", type=int, default=4, help="images per engine call")
    worker.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    worker.add_argument(
        "--lora-dir", type=Path, metavar="DIR", help="LoRA adapters requests may name (the API's --lora-dir)"
    )
    options.add_model_options(worker)

    usage = commands.add_parser("usage", help="usage per key: succeeded jobs, images, tiles, megapixels")
    usage.add_argument("--key", help="only this key (default: every key)")
    usage.add_argument("--since", type=_date, help="only jobs created on or after YYYY-MM-DD (local time)")
    usage.add_argument(
        "--by-adapter", action="store_true", help="jobs and images per key and LoRA adapter instead"
    )
    options.add_data_dir(usage)
    options.add_database_url(usage)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key and print it (shown once)")
    create.add_argument("--name", required=True)
    revoke = keys.add_parser("revoke", help="revoke a key")
    revoke.add_argument("name")
    listing = keys.add_parser("list", help="list keys")
    for sub in (create, revoke, listing):
        options.add_data_dir(sub)
        options.add_database_url(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command in ("serve", "api", "worker"):
            from kleinserve import cli_serving

            return cli_serving.run(args)
        if args.command == "keys":
            return _keys(args)
        if args.command == "usage":
            return _usage(args)
        if args.command == "toy":
            return _toy(args)
        if args.model_command == "create-tiny":
            from kleinserve.engine.tiny import create_tiny

            print(create_tiny(args.directory, seed=args.seed, distilled=not args.base))
            return 0
        if args.model_command == "prepare":
            return _prepare(args)
        return _info(args)
    except KleinError as exc:
        print(f"kleinserve: error: {exc.message}", file=sys.stderr)
        return 2


def _prepare(args: argparse.Namespace) -> int:
    """Load the model in int8 once: the load writes its prepared weights (engine/prepared.py)."""
    from kleinserve.engine import load_pipeline

    start = time.perf_counter()
    loaded = load_pipeline(
        args.model, components=args.components, download=args.download, device="cpu", quantize="int8"
    )
    kept = loaded.components.prepared_weights
    if kept is None:
        raise ModelLoadError(f"{args.model}: the int8 weights could not be written (see the warning above)")
    done = "written" if kept.written else "already prepared, and intact"
    size = kept.path.stat().st_size / 1e9
    print(f"{kept.path}: int8 weights {done} ({size:.2f} GB; {time.perf_counter() - start:.1f} s)")
    return 0


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    from kleinserve.engine.loading import inspect_source
    from kleinserve.engine.resolve import resolve_request
    from kleinserve.types import GenerateRequest, ImageFormat

    references = []
    for path in args.ref:
        try:
            references.append(Image.open(path))
        except (OSError, UnidentifiedImageError) as exc:
            raise InvalidInput(f"{path}: not a readable image ({exc})", param="ref") from None
    try:
        output_format = ImageFormat.parse(args.output.suffix.lstrip("."), param="output")
    except InvalidInput:
        raise InvalidInput(
            f"{args.output}: unknown image type", param="output", allowed=".png, .jpg, .webp"
        ) from None
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
        output_format=output_format,
    )
    # Resolved (checked) against the model's configs before spending minutes loading the weights.
    resolved = resolve_request(request, inspect_source(_source(args)).spec)
    pipeline = options.model_options(args).load()
    with tqdm(total=resolved.steps, desc="denoising", unit="step", file=sys.stderr) as bar:
        result = pipeline.generate_batch([resolved], on_step=lambda _: bar.update())[0]
    for path, image in zip(_output_paths(args.output, len(result.images)), result.images, strict=True):
        path.write_bytes(image.encode(request.output_format))
        print(f"{path}\tseed={image.seed}\t{result.width}x{result.height}")
    return 0


def _toy(args: argparse.Namespace) -> int:
    if args.toy_command == "train":
        from kleinserve.toy.config import TrainConfig
        from kleinserve.toy.train import continue_training, train

        config, log = TrainConfig(seed=args.seed), lambda line: print(line, flush=True)
        if args.inpaint_steps is not None:
            config = dataclasses.replace(config, inpaint_steps=args.inpaint_steps)
        if args.stage != "all":
            if args.source is None:
                raise InvalidInput(
                    f"--stage {args.stage} needs --from DIR", param="from", allowed="a toy model"
                )
            print(continue_training(args.source, args.out, config, log=log, stage=args.stage))
        else:
            print(train(args.out, config, log=log))
        return 0
    from kleinserve.engine import load_pipeline
    from kleinserve.toy.evaluate import SIDE_TARGETS, SIDES, TARGETS, evaluate

    # fp32: the figures (and the grid's pixels) should not depend on whether this CPU has bf16.
    pipeline = load_pipeline(args.model, dtype="float32")
    if args.toy_command == "grid":
        from kleinserve.toy.grid import draw_grid

        image = draw_grid(pipeline, count=args.count, sides=tuple(args.side or SIDES))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        image.save(args.out, optimize=True)
        print(f"{args.out}\t{image.width}x{image.height}")
        return 0
    score = evaluate(pipeline, count=args.count, edits=args.edits, inpaints=args.inpaints)
    print(
        f"{score.text_count} held-out captions, {score.edit_count} recolouring edits, {score.inpaint_count}"
        " masked edits, alternating 128 and 256 px"
    )
    print(f"{'':<14} {'all':>6}  " + "  ".join(f"{f'{side} px':>6}" for side in SIDES) + "  target")
    rows = [
        ("colour", "colour"),
        ("position", "position"),
        ("shape", "shape"),
        ("one shape", "clean"),
        ("background", "background"),
        ("edit colour", "edit_colour"),
        ("edit position", "edit_position"),
        ("edit shape", "edit_shape"),
        ("edit one shape", "edit_clean"),
    ]
    for label, name in rows:
        at_sides = [score.by_side.get(side, {}).get(name) for side in SIDES]  # None: none drawn there
        sided = "  ".join(f"{value:6.1%}" if value is not None else f"{'-':>6}" for value in at_sides)
        targets = [f">= {TARGETS[name]:.0%}"] if name in TARGETS else []
        targets += [f">= {SIDE_TARGETS[name]:.0%} at each side"] if name in SIDE_TARGETS else []
        print(f"{label:<14} {getattr(score, name):6.1%}  {sided}  {', '.join(targets)}".rstrip())
    empty = "  ".join(f"{'':>6}" for _ in SIDES)
    for label, name in (("masked colour", "inpaint_colour"), ("masked kept", "inpaint_kept")):
        print(f"{label:<14} {getattr(score, name):6.1%}  {empty}  >= {TARGETS[name]:.0%}")
    print(f"masked edits: mean |output - scene| outside the mask {score.inpaint_difference:.2f} / 255")
    return 0 if score.meets_targets() else 1


def _source(args: argparse.Namespace) -> ModelSource:
    """The model named by `args.model`, `--components` and `--download` (ModelLoadError if unusable)."""
    from kleinserve.engine.loading import resolve_source

    return resolve_source(args.model, components=args.components, download=args.download)


def _keys(args: argparse.Namespace) -> int:
    from kleinserve.api.auth import DATABASE_NAME, KeyStore, SqliteKeyStore

    store: KeyStore
    if args.database_url:
        from kleinserve.jobs.postgres import PostgresKeyStore

        store = PostgresKeyStore(args.database_url)
    else:
        store = SqliteKeyStore(args.data_dir / DATABASE_NAME)
    if args.keys_command == "create":
        print(store.create(args.name))
        print(f"kleinserve: key {args.name!r} created; it is shown only once", file=sys.stderr)
    elif args.keys_command == "revoke":
        store.revoke(args.name)
        print(f"revoked {args.name}")
    else:
        for key in store.list():
            state = "revoked" if key.revoked else "active"
            print(
                f"{key.name}\t{state}\tcreated {time.strftime('%Y-%m-%d %H:%M', time.localtime(key.created))}"
            )
    return 0


def _usage(args: argparse.Namespace) -> int:
    from kleinserve.api.auth import DATABASE_NAME
    from kleinserve.jobs.report import adapter_report, usage_report
    from kleinserve.jobs.store import JobStore, SqliteJobStore

    store: JobStore
    if args.database_url:
        from kleinserve.jobs.postgres import PostgresJobStore

        store = PostgresJobStore(args.database_url)
    else:
        database = args.data_dir / DATABASE_NAME
        if not database.exists():
            raise InvalidInput(f"{database}: no job database (is --data-dir right?)", param="data-dir")
        store = SqliteJobStore(database)
    try:
        report = adapter_report if args.by_adapter else usage_report
        lines = report(store.usage(args.key, args.since))
    finally:
        store.close()
    print("\n".join(lines))
    if len(lines) == 1:
        print("(no succeeded jobs)", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from kleinserve.engine.loading import inspect_source

    info = inspect_source(_source(args))
    gib = 1 << 30
    lines = {
        "variant": info.spec.name,
        "distilled": info.spec.distilled,
        "default steps": info.spec.default_steps,
        "default guidance": info.spec.default_guidance,
        "default size": f"{info.spec.default_side}x{info.spec.default_side}",
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
