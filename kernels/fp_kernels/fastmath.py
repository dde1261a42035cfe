"""``exp2`` on the FMA units, for moving part of the softmax's exponentials off the special-function
units (the polynomial trick of FlashAttention 4).

``2**x = 2**n * 2**f`` with ``n = round(x)`` and ``f = x - n`` in ``[-0.5, 0.5]``: ``2**f`` is a
degree-4 polynomial (Chebyshev fit, relative error below 4e-6, far under the bfloat16 rounding of
the probabilities that enter the ``P V`` dot), ``2**n`` is added to the float's exponent bits. The
rounding uses the ``1.5 * 2**23`` shift, so no conversion instruction is needed. Meant for the
max-shifted logits of an online softmax (``x <= 0``); ``x < -126`` (``-inf`` included) gives 0.
"""

import triton
import triton.language as tl

_SHIFT = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding it rounds a float of magnitude < 2**22 to an integer


@triton.jit
def exp2_fma(x):
    xc = tl.maximum(x, -127.0)
    shifted = xc + _SHIFT
    r = shifted - _SHIFT
    f = xc - r
    p = 0.009676046747496274 * f + 0.055922119292501016
    p = p * f + 0.24022107174899843
    p = p * f + 0.6931210235358917
    p = p * f + 1.0000000755330434
    n = shifted.to(tl.int32, bitcast=True) - 0x4B400000  # the integer r, from the shifted float's bits
    y = (p.to(tl.int32, bitcast=True) + (n << 23)).to(tl.float32, bitcast=True)
    return tl.where(x < -126.0, 0.0, y)


@triton.jit
def exp2_split(x, FMA_SHARE: tl.constexpr):
    """``2**x`` on a ``[M, N]`` tile: all on the special-function units (``FMA_SHARE == 0``), half of the
    columns on the FMA units (``1``), or all of them there (``2``)."""
    if FMA_SHARE == 0:
        return tl.exp2(x)
    elif FMA_SHARE == 2:
        return exp2_fma(x)
    else:
        M: tl.constexpr = x.shape[0]
        N: tl.constexpr = x.shape[1]
        a, b = tl.split(tl.reshape(x, [M, N // 2, 2]))
        return tl.reshape(tl.join(tl.exp2(a), exp2_fma(b)), [M, N])
