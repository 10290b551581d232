"""Model sources: what the user names -> files on local disk, checked before any weight is read
(engine/components.py then loads them).

Accepted sources (`resolve_source`):
- a directory in the diffusers layout (`model_index.json`, `scheduler/`, `text_encoder/`, `tokenizer/`,
  `transformer/`, `vae/`), e.g. what `hf download black-forest-labs/FLUX.2-klein-4B --local-dir DIR` writes;
- a Hugging Face repo id, resolved from the local HF cache (downloads only with `download=True`; the
  HF_HUB_OFFLINE environment variable is honoured by huggingface_hub);
- BFL's single-file transformer (`flux-2-klein-4b.safetensors`), with the text encoder, tokenizer, VAE and
  scheduler taken from a diffusers-layout directory (`components`, default: the file's own directory);
- `flux-2-klein-toy`, the embedded default model (src/kleinserve/models/, trained by `kleinserve toy train`);
- `tiny-random`, written once by `create_tiny` into kleinserve's cache directory and loaded like any other.

Every problem with a source is a ModelLoadError naming the file and what was expected.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kleinserve.engine import checkpoints
from kleinserve.engine.spec import TEXT_ENCODER_LAYERS, ModelSpec, detect_spec
from kleinserve.engine.tiny import TINY_NAME, create_tiny
from kleinserve.errors import ModelLoadError

_COMPONENT_CONFIGS = {
    "scheduler": "scheduler_config.json",
    "text_encoder": "config.json",
    "transformer": "config.json",
    "vae": "config.json",
}
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# The embedded default model, trained here by `kleinserve toy train` (src/kleinserve/toy) and shipped with
# the package: a real FLUX.2 [klein] at toy size, trained on flat shapes (README: what it gets right).
TOY_NAME = "flux-2-klein-toy"
TOY_DIR = Path(__file__).resolve().parents[1] / "models" / TOY_NAME
_TINY_VERSION = 1  # bump when create_tiny changes what it writes


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are: a diffusers-layout `directory`, optionally with a BFL `transformer_file`."""

    directory: Path
    transformer_file: Path | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("KLEINSERVE_CACHE", Path.home() / ".cache" / "kleinserve"))


def resolve_source(model: str, *, components: str | None = None, download: bool = False) -> ModelSource:
    """Turn what the user typed (`--model`, `--components`) into a ModelSource on local disk."""
    if model == TOY_NAME:
        if not (TOY_DIR / "model_index.json").exists():
            raise ModelLoadError(
                f"{TOY_DIR}: the embedded toy model is missing; `kleinserve toy train` makes it"
            )
        return ModelSource(directory=TOY_DIR)
    if model == TINY_NAME:
        directory = cache_dir() / f"{TINY_NAME}-v{_TINY_VERSION}"
        if not (directory / "model_index.json").exists():
            create_tiny(directory)
        return ModelSource(directory=directory)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(
                f"{path}: expected a .safetensors transformer checkpoint or a model directory"
            )
        base = resolve_source(components).directory if components else path.parent
        if not (base / "model_index.json").exists():
            raise ModelLoadError(
                f"{path}: a single-file transformer needs --components DIR (a diffusers-layout directory or "
                "repo id with the text encoder, tokenizer, VAE and scheduler); none found beside it"
            )
        return ModelSource(directory=base, transformer_file=path)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(
                f"{path}: unknown layout; expected model_index.json (the diffusers layout of "
                "black-forest-labs/FLUX.2-klein-4B) or a .safetensors transformer file"
            )
        single = None if (path / "transformer").is_dir() else _root_transformer_file(path)
        return ModelSource(directory=path, transformer_file=single)
    if _REPO_ID.match(model) and not model.startswith((".", "/")):
        return ModelSource(directory=_snapshot(model, download))
    raise ModelLoadError(f"{model}: no such file or directory, and not a Hugging Face repo id (owner/name)")


def _root_transformer_file(directory: Path) -> Path:
    candidates = sorted(directory.glob("flux-2-klein*.safetensors"))
    if not candidates:
        raise ModelLoadError(
            f"{directory}: no transformer/ folder and no flux-2-klein*.safetensors single-file checkpoint"
        )
    return candidates[0]


def _snapshot(repo_id: str, download: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=not download))
    except LocalEntryNotFoundError:
        hint = (
            ""
            if download
            else "; run `hf download {0} --local-dir DIR` and pass --model DIR, or add --download"
        )
        raise ModelLoadError(
            f"{repo_id}: not in the local Hugging Face cache{hint.format(repo_id)}"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelLoadError(f"{repo_id}: download failed ({exc})") from None


def read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a component folder, each header checked (missing, corrupt, truncated)."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(read_config(index[0]).get("weight_map", {}).values()))
        files = [folder / shard for shard in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no .safetensors weights found")
    for file in files:
        checkpoints.read_safetensors_header(file)
    return files


@dataclass(frozen=True)
class SourceInfo:
    """What the configs and safetensors headers of a source say, before any weight is read.

    Parameter counts are values; `text_encoder_parameters` counts only what the trimmed encoder loads.
    """

    spec: ModelSpec
    transformer_config: dict[str, Any]
    text_config: dict[str, Any]
    transformer_parameters: int
    text_encoder_parameters: int
    vae_parameters: int
    stored_dtypes: dict[str, str]  # component -> its most common safetensors dtype, e.g. "BF16"

    @property
    def fp32_bytes(self) -> int:
        return 4 * (self.transformer_parameters + self.text_encoder_parameters + self.vae_parameters)

    def stored_16bit(self, component: str) -> bool:
        return self.stored_dtypes[component] in ("BF16", "F16")

    @property
    def stored_bytes(self) -> int:
        counts = {
            "transformer": self.transformer_parameters,
            "text_encoder": self.text_encoder_parameters,
            "vae": self.vae_parameters,
        }
        return sum(n * (2 if self.stored_16bit(c) else 4) for c, n in counts.items())


def _headers(folder: Path) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for file in weight_files(folder):
        merged.update(checkpoints.read_safetensors_header(file))
    return merged


def _kept_text_encoder_entries(header: dict[str, Any]) -> dict[str, Any]:
    """Header entries of what the trimmed Qwen3 loads: embeddings and layers 0..26 (no norm, no LM head)."""
    last = max(TEXT_ENCODER_LAYERS)

    def kept(key: str) -> bool:
        if ".layers." in key:
            return int(key.split(".layers.")[1].split(".")[0]) < last
        return "embed_tokens" in key

    return {key: entry for key, entry in header.items() if kept(key)}


def inspect_source(source: ModelSource) -> SourceInfo:
    """Check the configs and headers of a source; a bad source fails here and names the file."""
    directory = source.directory
    model_index = read_config(directory / "model_index.json")
    for component, config_name in _COMPONENT_CONFIGS.items():
        if component == "transformer" and source.transformer_file is not None:
            continue
        read_config(directory / component / config_name)
    if not (directory / "tokenizer").is_dir():
        raise ModelLoadError(f"{directory / 'tokenizer'}: tokenizer folder not found")
    if source.transformer_file is None:
        transformer_config = read_config(directory / "transformer" / "config.json")
        transformer_header = _headers(directory / "transformer")
    else:
        transformer_header = checkpoints.read_safetensors_header(source.transformer_file)
        if not checkpoints.is_bfl_transformer(list(transformer_header)):
            raise ModelLoadError(
                f"{source.transformer_file}: not a FLUX.2 transformer in BFL naming "
                f"(expected a key {checkpoints.BFL_MARKER_KEY!r})"
            )
        transformer_config = checkpoints.infer_bfl_transformer_config(transformer_header)
    text_config = read_config(directory / "text_encoder" / "config.json")
    embedding_width = 3 * text_config["hidden_size"]
    if embedding_width != transformer_config["joint_attention_dim"]:
        raise ModelLoadError(
            f"{directory / 'text_encoder' / 'config.json'}: a text encoder of hidden_size "
            f"{text_config['hidden_size']} gives {embedding_width}-wide prompt embeddings, "
            f"but the transformer expects joint_attention_dim {transformer_config['joint_attention_dim']} "
            "(klein-4B needs Qwen3-4B, hidden_size 2560; klein-9B needs Qwen3-8B, hidden_size 4096)"
        )
    if text_config["num_hidden_layers"] < max(TEXT_ENCODER_LAYERS):
        raise ModelLoadError(
            f"{directory / 'text_encoder' / 'config.json'}: {text_config['num_hidden_layers']} layers, "
            f"expected at least {max(TEXT_ENCODER_LAYERS)} "
            f"(prompt embeddings read layers {TEXT_ENCODER_LAYERS})"
        )
    transformer_parameters = checkpoints.count_parameters(transformer_header)[0]
    text_header = _kept_text_encoder_entries(_headers(directory / "text_encoder"))
    vae_header = _headers(directory / "vae")
    return SourceInfo(
        spec=detect_spec(model_index, transformer_config, transformer_parameters),
        transformer_config=transformer_config,
        text_config=text_config,
        transformer_parameters=transformer_parameters,
        text_encoder_parameters=checkpoints.count_parameters(text_header)[0],
        vae_parameters=checkpoints.count_parameters(vae_header)[0],
        stored_dtypes={
            "transformer": _common_dtype(transformer_header),
            "text_encoder": _common_dtype(text_header),
            "vae": _common_dtype(vae_header),
        },
    )


def _common_dtype(header: dict[str, Any]) -> str:
    dtypes = [entry["dtype"] for entry in header.values()]
    return max(set(dtypes), key=dtypes.count)
