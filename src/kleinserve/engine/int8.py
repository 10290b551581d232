"""int8 Linear layers on the CPU (`--quantize int8`): fbgemm's dynamic quantization, packed in the background.

fbgemm's prepack (its blocked layout of an int8 weight) runs on one thread at ~5 s per GB of int8 on this
project's 2-core EPYC: at 4B (6.4 GB of int8 block weights) that alone is over half a minute, the largest part
of an int8 load. It releases the GIL, so `Prepacker` runs it on a thread per core while the loader reads on
(1.9x on 2 cores, measured on 8 klein-sized weights).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch
from torch import nn


class Prepacker:
    """Runs fbgemm prepacks on `threads` threads; at most 2 per thread wait, so that the loader, faster than
    the packing, does not pile up int8 weights in memory. `finish()` waits for all and re-raises a failure."""

    def __init__(self, threads: int | None = None) -> None:
        threads = threads or torch.get_num_threads()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="prepack")
        self._slots = threading.BoundedSemaphore(2 * threads)
        self._futures: list[Future[None]] = []

    def submit(self, layer: Int8Linear, qweight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self._slots.acquire()
        self._futures.append(self._pool.submit(self._pack, layer, qweight, bias))

    def _pack(self, layer: Int8Linear, qweight: torch.Tensor, bias: torch.Tensor | None) -> None:
        try:
            layer._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        finally:
            self._slots.release()

    def finish(self) -> None:
        self._pool.shutdown(wait=True)
        for future in self._futures:
            future.result()


class Int8Linear(nn.Module):
    """A Linear computed by fbgemm in int8: the weight quantized once, per tensor and symmetric (torch.ao's
    default dynamic qconfig), the input quantized per call (`reduce_range`, as torch.ao's dynamic Linear
    does for fbgemm), the output in the input's dtype. Pixels equal torch.ao's `quantize_dynamic`
    (tests/engine/test_precision.py::test_int8_linear_matches_torch_ao)."""

    def __init__(
        self, qweight: torch.Tensor, bias: torch.Tensor | None, packer: Prepacker | None = None
    ) -> None:
        """`qweight`: qint8, (out, in), per tensor; `bias`: fp32 or None. With `packer`, the layer is usable
        once `packer.finish()` returned."""
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.nbytes = qweight.numel() + (0 if bias is None else bias.numel() * bias.element_size())
        self._packed: object = None
        if packer is None:
            self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        else:
            packer.submit(self, qweight, bias)

    @classmethod
    def quantize(cls, linear: nn.Linear, packer: Prepacker | None = None) -> Int8Linear:
        """`linear`'s weight quantized as torch.ao's dynamic quantization does (MinMax observer)."""
        weight = linear.weight.detach().float()
        observer = torch.ao.quantization.default_dynamic_qconfig.weight()
        observer(weight)
        scale, zero_point = observer.calculate_qparams()
        qweight = torch.quantize_per_tensor(weight, float(scale), int(zero_point), torch.qint8)
        del weight  # the fp32 copy goes before fbgemm's packed one is made
        bias = None if linear.bias is None else linear.bias.detach().float()
        return cls(qweight, bias, packer)

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The quantized weight (qint8, (out, in)) and the fp32 bias, unpacked from fbgemm's layout."""
        weight, bias = torch.ops.quantized.linear_unpack(self._packed)
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, reduce_range=True).to(x.dtype)


class Int8Source(Protocol):
    def has(self, name: str) -> bool:
        """Whether the Linear `name`'s int8 weight is kept (its float weight then need not be read)."""
        ...

    def int8_linear(self, name: str, linear: nn.Linear, packer: Prepacker) -> Int8Linear:
        """`linear` (named `name`) as an Int8Linear, its int8 weight computed or read where it is kept."""
        ...
