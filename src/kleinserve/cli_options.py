"""The `kleinserve` command's shared flags: where the model comes from and how it is loaded, the data dir, the
HTTP server's settings and limits, and the scale-out database and media (cli.py builds the parser from them).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine loads torch: only when a command runs
    from kleinserve.engine import ModelOptions

DEFAULT_MODEL = os.environ.get("KLEINSERVE_MODEL", "flux-2-klein-toy")


# `serve`'s flags for ConnectionLimits (api/limits.py): flag -> (field, type, help); defaults are the fields'.
CONNECTION_FLAGS = {
    "--max-connections": (
        "max_connections",
        int,
        "connections served at once (default: from the open-file limit)",
    ),
    "--max-head-bytes": ("max_head_bytes", int, "request line + header fields"),
    "--max-headers": ("max_headers", int, "header fields in a request"),
    "--head-timeout": ("head_timeout_s", float, "seconds to send a request head"),
    "--body-idle-timeout": ("body_idle_timeout_s", float, "seconds a body may stall"),
    "--body-timeout": ("body_timeout_s", float, "seconds to send a whole body"),
    "--keep-alive-timeout": ("keep_alive_timeout_s", float, "seconds an idle connection stays"),
}


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    from kleinserve.api.limits import ConnectionLimits

    group = parser.add_argument_group("connection limits")
    for flag, (field, kind, text) in CONNECTION_FLAGS.items():
        default = getattr(ConnectionLimits, field)
        shown = "" if default is None else " (default %(default)s)"
        group.add_argument(flag, dest=field, type=kind, default=default, help=text + shown)


def add_source_options(parser: argparse._ActionsContainer) -> None:
    """Where the model's files come from, besides the model argument itself (see `_source`)."""
    parser.add_argument(
        "--components", help="with a BFL single file: directory or repo id of the other parts"
    )
    parser.add_argument(
        "--download", action="store_true", help="fetch a repo id from the Hugging Face Hub (the whole model)"
    )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="directory, BFL .safetensors, repo id, flux-2-klein-toy (default) or tiny-random",
    )
    add_source_options(group)
    group.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument(
        "--dtype", help="compute dtype: float32, bfloat16, float16 (default: cuda bf16, cpu fp32)"
    )
    group.add_argument(
        "--quantize",
        choices=["int8", "fp8"],
        help="int8 (CPU) or fp8 (GPUs with float8 tensor cores) dynamic quantization (faster, drifts)",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer blocks (GPU; each new size compiles on its first request)",
    )
    group.add_argument("--offload", action="store_true", help="CUDA: keep idle components on the CPU")
    group.add_argument("--memory-budget", type=float, metavar="GIB", help="RAM the weights may use")


def model_options(args: argparse.Namespace) -> ModelOptions:
    """The model and its loading options that `add_model_options`'s flags name."""
    from kleinserve.engine import ModelOptions

    return ModelOptions(
        args.model,
        components=args.components,
        download=args.download,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        offload=args.offload,
        memory_budget_gib=args.memory_budget,
        compile=args.compile,
    )


def add_database_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        default=os.environ.get("KLEINSERVE_DATABASE_URL"),
        help="scaled out: the PostgreSQL database of `kleinserve api` (default $KLEINSERVE_DATABASE_URL)",
    )


def add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    add_data_dir(parser)
    parser.add_argument("--queue-size", type=int, default=64, help="requests that may wait for the engine")
    parser.add_argument(
        "--max-in-flight-per-key", type=int, default=24, help="queued + running jobs one key may have"
    )
    parser.add_argument("--media-ttl", type=int, default=600, help="seconds a result URL stays valid")
    parser.add_argument(
        "--allow-private-urls", action="store_true", help="fetch references from private hosts"
    )
    parser.add_argument(
        "--insecure-no-auth", action="store_true", help="allow a non-loopback host without keys"
    )
    parser.add_argument(
        "--public-url",
        metavar="URL",
        help="the server's public origin, for BFL's polling and webhook URLs (default: each request's)",
    )
    parser.add_argument(
        "--lora-dir", type=Path, metavar="DIR", help="LoRA adapters (*.safetensors) requests may name"
    )
    parser.add_argument(
        "--allow-lora-urls", action="store_true", help="let requests give https URLs of LoRA adapters"
    )
    add_connection_options(parser)


def add_scale_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale out")
    group.add_argument(
        "--database-url",
        default=os.environ.get("KLEINSERVE_DATABASE_URL"),
        required="KLEINSERVE_DATABASE_URL" not in os.environ,
        help="postgresql://... : jobs, keys, usage (default $KLEINSERVE_DATABASE_URL)",
    )
    group.add_argument(
        "--media-url",
        default=os.environ.get("KLEINSERVE_MEDIA_URL"),
        help="s3://bucket/prefix (credentials: AWS_* variables); default: the data dir (one machine only)",
    )
    group.add_argument("--lease-seconds", type=float, default=20.0, help="a claimed job's lease")


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    default = Path(os.environ.get("KLEINSERVE_DATA", "data"))
    parser.add_argument("--data-dir", type=Path, default=default, help="keys, media, jobs (default ./data)")
