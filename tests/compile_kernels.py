"""Compile every kernel variant for Hopper (sm_90) with Triton's NVIDIA backend; no GPU needed.

Run by tests/test_compile.py in a subprocess without TRITON_INTERPRET (under the interpreter
@triton.jit returns functions the compiler cannot take). Prints one line per variant and exits
non-zero if any variant fails to compile.
"""

from __future__ import annotations

import os
import sys
import traceback

assert os.environ.get("TRITON_INTERPRET") != "1", "compile without the interpreter"

from precision_ce.kernels.cross_entropy import generalised_ce_backward, generalised_ce_forward  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as compile_kernel  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
FORWARD_FLAGS = ("SHAPED", "FOCAL", "HAS_HEAD", "HAS_STATS", "HAS_NEGATIVES", "HAS_WEIGHT",
                 "HAS_SMOOTHING", "HAS_Z_LOSS", "HAS_SOFTCAP")
BACKWARD_FLAGS = ("HAS_RANK", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP")
INTEGER_ARGS = {"stride_row", "grad_rows_stride", "grad_stride_row", "V", "ignore_index", "k"}


def argument_type(name: str, dtype: str) -> str:
    """Triton signature type of a kernel argument, from the names the kernels use."""
    pointers = {"logits_ptr": dtype, "grad_ptr": dtype, "target_ptr": "i64", "threshold_ptr": "i64",
                "last_tie_ptr": "i32"}
    if name.endswith("_ptr"):
        return "*" + pointers.get(name, "fp32")
    return "i32" if name in INTEGER_ARGS else "fp32"


def compile_for_hopper(kernel, dtype: str, flags: dict[str, bool]) -> None:
    """Compile one variant with the launch block size the host uses on CUDA (16 KiB of logits)."""
    constexprs = dict(flags, BLOCK=16384 // (4 if dtype == "fp32" else 2), KEY_BITS=32 if dtype == "fp32" else 16)
    signature = {name: "constexpr" if name in constexprs else argument_type(name, dtype)
                 for name in kernel.arg_names}
    compiled = compile_kernel(ASTSource(kernel, signature, constexprs=constexprs), target=HOPPER,
                              options={"num_warps": 8})
    assert compiled.asm["cubin"], "ptxas produced no machine code"


IMPLIED = {"FOCAL": "SHAPED", "HAS_STATS": "HAS_HEAD"}
"""Flags that only come with another (the host never sets the first without the second)."""


def flag_sets(flags: tuple[str, ...]) -> dict[str, dict[str, bool]]:
    """All off, all on, and each flag alone (with the flag it implies)."""
    sets = {"none": dict.fromkeys(flags, False), "all": dict.fromkeys(flags, True)}
    for flag in flags:
        sets[flag] = dict(sets["none"], **{flag: True})
        if flag in IMPLIED:
            sets[flag][IMPLIED[flag]] = True
    return sets


def variants():
    """(label, kernel, dtype, flags): all off / all on per dtype, each feature alone in bf16."""
    for kernel, flags in ((generalised_ce_forward, FORWARD_FLAGS), (generalised_ce_backward, BACKWARD_FLAGS)):
        sets = flag_sets(flags)
        for dtype in ("fp32", "bf16", "fp16"):
            for name in ("none", "all"):
                yield f"{kernel.__name__} {dtype} {name}", kernel, dtype, sets[name]
        for flag in flags:
            yield f"{kernel.__name__} bf16 {flag}", kernel, "bf16", sets[flag]


def main() -> int:
    failures = 0
    print(f"variants: {len(list(variants()))}")
    for label, kernel, dtype, flags in variants():
        try:
            compile_for_hopper(kernel, dtype, flags)
            print(f"ok     {label}")
        except Exception:  # report every broken variant, not just the first
            failures += 1
            print(f"FAILED {label}\n{traceback.format_exc(limit=1)}")
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
