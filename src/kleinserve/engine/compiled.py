"""Regional compilation (`--compile`): each transformer block compiled by `torch.compile`, the rest eager.

Why the blocks and not the whole transformer: klein-4B repeats two block classes (5 double-stream, 20
single-stream blocks) that hold nearly all of its FLOPs, and since torch 2.5 blocks of one class share one
compiled graph (their parameters are graph inputs), so compiling costs two graphs per input shape instead of
one huge one (diffusers' regional compilation: about 7x less compile time for the same speed). Gains are
largest on GPUs (performance.md section 6: 1.43x per FLUX.1 forward with Inductor); on the CPU it is lossless
but is not shown to be faster, and the first request of each size waits for its compilation.

`fullgraph=True`: a graph break inside a block would silently split it into eager pieces; here it is an error
at the first call instead. `dynamic=False`: every (size, batch) gets a graph specialised to its shapes, the
fastest kernels, compiled on first use; a server should warm up the sizes it serves.
"""

from __future__ import annotations

import torch
from torch import nn

from kleinserve.engine.weights import BLOCK_LISTS

# Entries per compiled code object before torch falls back to eager: one per (size, batch) served, per block
# class, and again per precision. torch's default (8) runs out after a few sizes and batch sizes.
RECOMPILE_LIMIT = 64


def compile_blocks(transformer: nn.Module) -> int:
    """Compile every block of `transformer`'s block lists in place (`Module.compile`, which keeps the module
    and its parameters: LoRA wrapping and state dicts see the same names). Returns the number of blocks. The
    compilation itself happens at each block's first call with a new input shape."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    count = 0
    for list_name in BLOCK_LISTS:  # Flux2's double and single blocks (the text encoder's "layers": none)
        for block in getattr(transformer, list_name, []):
            block.compile(fullgraph=True, dynamic=False)
            count += 1
    return count


def is_compiled(module: nn.Module) -> bool:
    """Whether `module` was compiled in place by `Module.compile`."""
    return getattr(module, "_compiled_call_impl", None) is not None
