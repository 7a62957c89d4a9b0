"""Element-wise helpers of the loss kernels: e^x, log1p, expm1, tanh and the softcap, written
with plain exp/log (libdevice calls do not run under the interpreter of every Triton version)."""

import torch
import triton
import triton.language as tl

# Globals a kernel reads must be tl.constexpr instances (an annotation is not enough).
LOG2E = tl.constexpr(1.4426950408889634)
# Compiled kernels take e^x from one ex2.approx.ftz (MUFU.EX2 after a multiply); tl.exp's
# ex2.approx without .ftz adds a compare and two multiplies per element to keep subnormal results
# (< 2**-126, ~1e-38). Flushed here: such a term changes no sum of the row (its max term is 1) and
# no gradient beyond the flush. The interpreter and ROCm run no PTX: they take tl.exp.
PTX_EXP = tl.constexpr(not triton.knobs.runtime.interpret and torch.version.hip is None)


@triton.jit
def _exp(x):
    """e^x (fp32) for the per-element exponentials; subnormal results flushed to 0 when compiled."""
    if PTX_EXP:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * LOG2E], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def _log1p(x):
    # Goldberg: log(1 + x) accurate for small x with plain log.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _expm1(x):
    # Kahan: exp(x) - 1 accurate for small x with plain exp and log.
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, (u - 1.0) * (x / tl.log(u))))


@triton.jit
def _tanh(x):
    # tanh|x| = -expm1(-2|x|) / (2 + expm1(-2|x|)): no overflow, accurate near 0.
    t = _expm1(-2.0 * tl.abs(x))
    r = -t / (2.0 + t)
    return tl.where(x < 0, -r, r)


@triton.jit
def _softcap(x, softcap, HAS_SOFTCAP: tl.constexpr):
    # -inf stays -inf: padding must keep probability 0, not become -softcap.
    if HAS_SOFTCAP:
        x = tl.where(x == float("-inf"), x, softcap * _tanh(x / softcap))
    return x
