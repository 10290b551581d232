"""float8 Linear layers (`--quantize fp8`): weights in float8 e4m3 with one scale per output row, activations
quantized per token at run time (W8A8 dynamic, as torchao's `Float8DynamicActivationFloat8WeightConfig` with
`PerRow` granularity), multiplied by `torch._scaled_mm`.

Meant for GPUs with float8 tensor cores: Hopper (H100/H200) and later, where cuBLASLt's row-wise scaled
float8 GEMM runs at about twice bf16's rate (performance.md section 6: klein's Linears are 81 % of its
FLOPs at 1024x1024). Why not torchao: its float8 configuration refuses to run without such a GPU (it
asserts CUDA compute capability >= 8.9), so its path could not run in this project's CPU test suite at all;
the arithmetic below is the same and takes a page.

On the CPU, torch (>= 2.7) has a `_scaled_mm` of its own, used here only so that the tests exercise the code
the GPU runs (tests/engine/test_gpu_paths.py): it is no faster than bf16 there, and `--quantize int8` is the
CPU's quantization.

Only the transformer blocks' Linears are quantized (precision.Placer): the embedders, modulation and output
projections are a few % of the FLOPs and cost the most PSNR when quantized (README, Performance, for int8).
A Linear whose sides are not multiples of 16 stays as it is (cuBLASLt's float8 GEMM needs them).
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448: the largest e4m3 value; each row's or token's amax maps to it
_MIN_SCALE = 1e-12  # an all-zero row or token: any scale quantizes it to zeros, but not a division by 0
_ALIGNMENT = 16  # cuBLASLt: float8 GEMM dimensions are multiples of 16


def can_quantize(linear: nn.Linear) -> bool:
    """Whether `linear`'s sides suit the float8 GEMM (multiples of 16)."""
    return linear.in_features % _ALIGNMENT == 0 and linear.out_features % _ALIGNMENT == 0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (M, K) in any float dtype -> (float8 values (M, K), fp32 scales (M, 1)) with x ~= values * scales:
    each row's largest magnitude becomes FP8_MAX (symmetric, round to nearest, saturating)."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=_MIN_SCALE) / FP8_MAX
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Float8Linear(nn.Module):
    """A Linear computed in float8: `weight` (out, in) float8 e4m3 and `weight_scale` (1, out) fp32 buffers,
    `bias` (out,) in the compute dtype or None. The output has the input's dtype."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        """`weight` (out, in) float8, `weight_scale` (out, 1) or (1, out) fp32 with dequantized weight =
        weight * weight_scale per row."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        # (1, out): _scaled_mm's row-wise scale of its second operand, the transposed weight.
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).float())
        self.register_buffer("bias", bias)

    @classmethod
    def quantize(cls, linear: nn.Linear, dtype: torch.dtype) -> Float8Linear:
        """`linear` with its weight quantized per output row where it lives (device and all), its bias in
        the compute `dtype`."""
        weight, scale = quantize_rows(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        return cls(weight, scale, bias)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight, scales and bias."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the float8 values and scales stand for, fp32 (out, in); for tests and drift reports."""
        return self.weight.float() * self.weight_scale.reshape(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        values, scale = quantize_rows(x.reshape(-1, self.in_features))  # per token
        # cuBLASLt's row-wise scaled float8 GEMM writes bf16 only; the CPU's writes any float dtype.
        out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
        # The weight is row-major (out, in), so its transpose is the column-major operand _scaled_mm needs.
        # use_fast_accum on CUDA, as torchao's float8 inference default: Hopper's faster float8 accumulation.
        out = torch._scaled_mm(
            values,
            self.weight.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            out_dtype=out_dtype,
            use_fast_accum=x.is_cuda,
        ).to(x.dtype)
        if self.bias is not None:  # added apart: _scaled_mm's bias must be bf16 on CUDA
            out = out + self.bias.to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)
