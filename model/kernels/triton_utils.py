"""Small helpers shared by our Triton kernels."""

import triton
import triton.language as tl


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """Cast fp32 ``x`` to ``dtype`` rounding to nearest-even, in compiled and interpreter mode.

    Compiled Triton already rounds fp32 -> bf16 to nearest-even, but Triton's CPU interpreter
    truncates (and flushes bf16 subnormals), which would make interpreter tests drift from the GPU
    and from torch by one bf16 ulp. So for bf16 the rounding is done here on the fp32 bits: add
    half an ulp plus the tie-to-even bit, keep the high 16 bits, and reinterpret them as bf16,
    which is exact in both modes. A NaN whose payload sits only in the low 16 bits may turn into
    inf; NaNs produced by arithmetic do not.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(dtype)
    return out
