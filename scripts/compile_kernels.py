"""Compile every kernel variant for Hopper (sm_90) with Triton's NVIDIA backend; no GPU needed.

    python scripts/compile_kernels.py              # one line per variant; exit 1 if any fails
    python scripts/compile_kernels.py --resources  # ptxas registers/spills at the launch config

tests/test_compile.py runs it in a subprocess without TRITON_INTERPRET (under the interpreter
@triton.jit returns functions the compiler cannot take).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import traceback

assert os.environ.get("TRITON_INTERPRET") != "1", "compile without the interpreter"

import triton  # noqa: E402
from precision_ce.kernels.cross_entropy import generalised_ce_backward, generalised_ce_forward  # noqa: E402
from precision_ce.kernels.vocab_parallel import vocab_shard_partials  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as compile_kernel  # noqa: E402

from precision_ce import triton_backend  # noqa: E402
from precision_ce.triton_backend import cuda_launch_config  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
FORWARD_FLAGS = ("SHAPED", "FOCAL", "HAS_HEAD", "HAS_STATS", "HAS_NEGATIVES", "HAS_WEIGHT",
                 "HAS_SMOOTHING", "HAS_Z_LOSS", "HAS_SOFTCAP")
BACKWARD_FLAGS = ("HAS_RANK", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP")
SHARD_FLAGS = ("HAS_HEAD", "HAS_STATS", "HAS_PLOGP", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP")
INTEGER_ARGS = {"stride_row", "grad_rows_stride", "grad_stride_row", "V", "vocab_start", "ignore_index", "k"}


def argument_type(name: str, dtype: str) -> str:
    """Triton signature type of a kernel argument, from the names the kernels use."""
    pointers = {"logits_ptr": dtype, "grad_ptr": dtype, "target_ptr": "i64", "threshold_ptr": "i32",
                "candidates_ptr": "i32", "last_tie_ptr": "i32", "threshold_value_ptr": dtype,
                "threshold_key_ptr": "i32", "tie_budget_ptr": "i32"}
    if name.endswith("_ptr"):
        return "*" + pointers.get(name, "fp32")
    return "i32" if name in INTEGER_ARGS else "fp32"


def compile_for_hopper(kernel, dtype: str, flags: dict[str, bool]):
    """Compile one variant at the host's CUDA launch config (``cuda_launch_config``)."""
    element_size = 4 if dtype == "fp32" else 2
    # Compiled without alignment, i.e. for unaligned rows, where a forward with a head may take the
    # rank backward's blocks (the host's rule).
    narrow = flags.get("HAS_RANK") or (flags.get("HAS_HEAD") and kernel.__name__ == "generalised_ce_forward"
                                       and triton_backend.head_takes_narrow_blocks(element_size, aligned=False))
    launch = cuda_launch_config(1 << 17, element_size, bool(narrow))  # a 128K vocabulary
    constexprs = dict(flags, BLOCK=launch["BLOCK"], KEY_BITS=32 if dtype == "fp32" else 16)
    if "CAP" in kernel.arg_names:
        constexprs["CAP"] = triton_backend.candidate_room(100)  # the presets' k
    if "LANE" in kernel.arg_names:
        # Compiled here without the runtime's alignment attributes, that is for unaligned rows,
        # where the host takes one lane (triton_backend.lane_width; kernel_report.py compiles the
        # aligned variants with their 16-byte lanes).
        constexprs["LANE"] = launch["BLOCK"]
    signature = {name: "constexpr" if name in constexprs else argument_type(name, dtype)
                 for name in kernel.arg_names}
    compiled = compile_kernel(ASTSource(kernel, signature, constexprs=constexprs), target=HOPPER,
                              options={"num_warps": launch["num_warps"]})
    assert compiled.asm["cubin"], "ptxas produced no machine code"
    return compiled


def ptxas_resources(compiled) -> str:
    """Registers, stack and spills of a compiled kernel, from ``ptxas -v`` on its PTX."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = sorted(glob.glob(os.path.join(bin_dir, "ptxas*")))[-1]  # the newest bundled ptxas
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as ptx:
        ptx.write(compiled.asm["ptx"])
    report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull],
                            capture_output=True, text=True).stderr
    os.unlink(ptx.name)
    keep = ("Used", "spill")
    return "; ".join(line.split("info    : ")[-1].strip() for line in report.splitlines()
                     if any(word in line for word in keep))


IMPLIED = {"FOCAL": "SHAPED"}
"""Flags that only come with another (the host never sets the first without the second)."""
SHARD_IMPLIED = {"HAS_STATS": "HAS_HEAD"}
"""The same for the shard kernel (its target rank needs the head exchange's global target logit)."""


def flag_sets(flags: tuple[str, ...], implied: dict[str, str] = IMPLIED) -> dict[str, dict[str, bool]]:
    """All off, all on, and each flag alone (with the flag it implies)."""
    sets = {"none": dict.fromkeys(flags, False), "all": dict.fromkeys(flags, True)}
    for flag in flags:
        sets[flag] = dict(sets["none"], **{flag: True})
        if flag in implied:
            sets[flag][implied[flag]] = True
    return sets


def variants():
    """(label, kernel, dtype, flags): all off / all on per dtype, each feature alone in bf16."""
    kernels = ((generalised_ce_forward, FORWARD_FLAGS, IMPLIED), (generalised_ce_backward, BACKWARD_FLAGS, IMPLIED),
               (vocab_shard_partials, SHARD_FLAGS, SHARD_IMPLIED))
    for kernel, flags, implied in kernels:
        sets = flag_sets(flags, implied)
        for dtype in ("fp32", "bf16", "fp16"):
            for name in ("none", "all"):
                yield f"{kernel.__name__} {dtype} {name}", kernel, dtype, sets[name]
        for flag in flags:
            yield f"{kernel.__name__} bf16 {flag}", kernel, "bf16", sets[flag]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", action="store_true", help="also print ptxas registers and spills")
    args = parser.parse_args(argv)
    failures = 0
    print(f"variants: {len(list(variants()))}")
    for label, kernel, dtype, flags in variants():
        try:
            compiled = compile_for_hopper(kernel, dtype, flags)
            print(f"ok     {label}" + (f"  [{ptxas_resources(compiled)}]" if args.resources else ""))
        except Exception:  # report every broken variant, not just the first
            failures += 1
            print(f"FAILED {label}\n{traceback.format_exc(limit=1)}")
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
