"""What the kernels will cost on Hopper, from evidence available without a GPU.

For every production variant (mode x dtype x vocabulary) this script

1. runs the public API (``precision_ce.cross_entropy(..., backend="triton")``, forward and
   backward) with Triton's launcher replaced by a recorder, so it sees the launches the host code
   really makes: kernel, arguments, flags, and the CUDA launch configuration (BLOCK, warps);
2. compiles each launch for sm_90 the way the runtime would, through Triton's own argument binder:
   the same signature, constexprs and alignment specialisation (``tt.divisibility=16`` on 16-byte
   aligned pointers and on integers divisible by 16, e.g. V = 128256 and the row stride);
3. reads registers, spills and shared memory of the cubin (``cuobjdump --dump-resource-usage``)
   and the SASS (``nvdisasm``): each loop of the kernel (a backward branch) is one pass over the
   row; its static instruction count is what a warp issues per BLOCK-element iteration, and x 32 x
   warps / BLOCK, per element; LDGSTS (cp.async) and the vector width of the loads are listed;
4. counts the HBM traffic under the Triton interpreter (``precision_ce.bench.traffic``, a few rows
   at the production BLOCK), in passes over the logits;
5. predicts the time of one forward and backward at N tokens on an H100 SXM and an H200 with the
   model documented in docs/design.md ("Kernel report"). Every time it prints is "predicted".

    python scripts/kernel_report.py                 # Markdown table, both vocabularies, all modes
    python scripts/kernel_report.py --json out.json # the same numbers as JSON, also written to a file
    python scripts/kernel_report.py --modes cross_entropy --dtypes bf16 --vocab 4096   # quick

Runs without TRITON_INTERPRET (it compiles); the traffic count runs in a subprocess with it.
Compiles are cached by Triton (~/.triton/cache), so a second run is quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import torch
import triton
import triton.language as tl
from compile_kernels import HOPPER
from triton import knobs
from triton.compiler import ASTSource, make_backend
from triton.compiler import compile as compile_kernel
from triton.runtime.jit import JITFunction, create_function_from_signature

from precision_ce import triton_backend
from precision_ce.bench.traffic import DTYPES, MODES, launch_config, mode_forward

NVIDIA_BIN = Path(knobs.__file__).parent / "backends" / "nvidia" / "bin"


@dataclasses.dataclass(frozen=True)
class Device:
    """Nominal figures of a GPU (the data sheets'); the model's assumptions are in ``Model``."""

    name: str
    bandwidth: float  # bytes/s, nominal HBM bandwidth
    sms: int


DEVICES = (Device("H100 SXM", 3.35e12, 132), Device("H200", 4.8e12, 132))


@dataclasses.dataclass(frozen=True)
class Model:
    """Assumptions of the roofline model (docs/design.md, "Kernel report"); command-line overridable."""

    achieved_bandwidth: float = 0.90  # fraction of nominal HBM bandwidth the best streaming kernels reach
    latency: float = 700e-9  # s, a global load that misses L2, on a loaded memory system
    clock: float = 1.98e9  # Hz, Hopper's boost clock (a memory-bound kernel stays under the power limit)
    schedulers_per_sm: int = 4  # each issues at most one warp instruction per clock


REGISTERS_PER_SM, THREADS_PER_SM, SHARED_PER_SM, CTAS_PER_SM = 65536, 2048, 228 * 1024, 32


# --- 1. the launches the public API makes -------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict[str, Any]
    phase: str  # "forward" or "backward"


@contextmanager
def _recorded_launches(launches: list[Launch], phase: list[str]):
    """JITFunction.run records instead of running; the host picks its CUDA launch configuration."""
    saved_run = JITFunction.run
    saved_interpret = os.environ.get("TRITON_INTERPRET")

    def record(self, *args, grid, warmup, **kwargs):
        # By name: a launch from inside an autograd.Function (inplace_backward) passes all positionally.
        launches.append(Launch(self, (), {**dict(zip(self.arg_names, args, strict=False)), **kwargs}, phase[0]))

    JITFunction.run = record
    # api._backend admits CPU tensors only under the interpreter; nothing runs here anyway.
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with launch_config():
            yield
    finally:
        JITFunction.run = saved_run
        if saved_interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved_interpret


def launches_of(mode: str, dtype: str, vocab: int, rows: int = 2) -> list[Launch]:
    """Kernel launches of one forward and backward of ``precision_ce.cross_entropy`` in ``mode``."""
    launches: list[Launch] = []
    phase = ["forward"]
    with _recorded_launches(launches, phase):
        _, forward = mode_forward(mode, rows=rows, vocab=vocab, dtype=dtype)
        loss = forward()
        phase[0] = "backward"
        loss.backward()
    return launches


# --- 2. compiled as the runtime would -----------------------------------------------------------------

_COMPILED: dict[str, Any] = {}


def compile_launch(launch: Launch):
    """Compile for sm_90 through the runtime's binder: its signature, constexprs and alignment attrs."""
    backend = make_backend(HOPPER)
    kwargs = dict(launch.kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = repr((launch.kernel.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()),
                sorted(options.__dict__.items())))
    if key not in _COMPILED:
        _COMPILED[key] = compile_kernel(ASTSource(launch.kernel, signature, constexprs, attrs), target=HOPPER,
                                        options=options.__dict__)
    return _COMPILED[key], attrs


# --- 3. resources and SASS ------------------------------------------------------------------------------

def _cubin_tool(tool: str, compiled, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as cubin:
        cubin.write(compiled.asm["cubin"])
    try:
        return subprocess.run([str(NVIDIA_BIN / tool), *flags, cubin.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(cubin.name)


def resources(compiled) -> dict[str, int]:
    """Registers per thread, spill (local) and stack bytes, static shared memory of the cubin."""
    usage = _cubin_tool("cuobjdump", compiled, "--dump-resource-usage")
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {"registers": int(fields["REG"]), "spill_bytes": int(fields["LOCAL"]), "stack_bytes": int(fields["STACK"]),
            # Triton's dynamic shared memory (reductions, histograms) is in the metadata, not the cubin.
            "shared_bytes": max(int(fields["SHARED"]), int(compiled.metadata.shared))}


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L\w+):")


def sass_instruction_count(sass: str) -> int:
    """Instructions of a SASS listing, NOPs excluded."""
    return sum(1 for line in sass.splitlines() if (match := _INSTRUCTION.search(line)) and match.group(2) != "NOP")


def sass_loops(sass: str) -> list[dict[str, Any]]:
    """The outermost loops of a SASS listing (``nvdisasm``), in address order.

    A loop is a backward branch and its target; each outermost loop is one pass over the row.
    ``instructions``: static count of the loop body (every branch arm counted once), NOPs excluded.
    """
    labels: dict[str, int] = {}
    pending: list[str] = []
    instructions: list[tuple[int, str, str]] = []
    for line in sass.splitlines():
        if match := _LABEL.match(line.strip()):
            pending.append(match.group(1))
        elif match := _INSTRUCTION.search(line):
            address = int(match.group(1), 16)
            labels.update(dict.fromkeys(pending, address))
            pending = []
            instructions.append((address, match.group(2), match.group(3)))
    loops = []
    for address, opcode, operands in instructions:
        target = re.search(r"\(\s*(\.L\w+)\s*\)", operands)
        if opcode.startswith("BRA") and target and labels.get(target.group(1), address + 1) <= address:
            loops.append((labels[target.group(1)], address))
    outermost = [loop for loop in loops if not any(o[0] <= loop[0] and loop[1] <= o[1] and o != loop for o in loops)]
    result = []
    for start, end in sorted(set(outermost)):
        if start == end:  # the trap after EXIT branches to itself
            continue
        body = [(op, operands) for address, op, operands in instructions if start <= address <= end and op != "NOP"]
        loads = sorted({op for op, _ in body if op.startswith("LDG")})
        result.append({
            "instructions": len(body),
            "inner_loops": sum(1 for loop in loops if start <= loop[0] and loop[1] <= end) - 1,
            "global_loads": loads,
            "global_stores": sorted({op for op, _ in body if op.startswith("STG")}),
            "cp_async": any(op.startswith("LDGSTS") for op, _ in body),
            "barriers": sum(1 for op, _ in body if op.startswith("BAR")),
        })
    return result


@triton.jit
def online_logsumexp(x_ptr, out_ptr, stride_row, V, BLOCK: tl.constexpr):
    """Yardstick: the least an online log-sum-exp loop can issue (no guards, no target, no extras)."""
    row_ptr = x_ptr + tl.program_id(0).to(tl.int64) * stride_row
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    tl.store(out_ptr + tl.program_id(0), m + tl.log(s))


def yardstick_launch(dtype: str, vocab: int) -> Launch:
    logits = torch.zeros(2, vocab, dtype=DTYPES[dtype])
    config = triton_backend.cuda_launch_config(vocab, logits.element_size())
    return Launch(online_logsumexp, (logits, torch.zeros(2), vocab, vocab), config, "forward")


# --- 5. the roofline model (docs/design.md, "Kernel report") ---------------------------------------

def ctas_per_sm(registers: int, warps: int, shared: int) -> int:
    """Resident programs per SM: registers (allocated per warp in units of 256), threads, shared memory."""
    registers_per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = REGISTERS_PER_SM // (registers_per_warp * warps)
    by_shared = SHARED_PER_SM // shared if shared else CTAS_PER_SM
    return max(0, min(by_registers, THREADS_PER_SM // (warps * 32), by_shared, CTAS_PER_SM))


def loop_seconds(kernel: dict[str, Any], loop: dict[str, Any], tokens: int, vocab: int, element_size: int,
                 device: Device, model: Model, writes_logits: bool = True,
                 extra_instructions: float = 0.0) -> tuple[float, str]:
    """Seconds of one loop of a launch over ``tokens`` rows if every row runs it, and what bounds it.

    ``iterations`` BLOCK-element iterations per SM; a program's iteration issues ``compute`` =
    instructions x warps / (schedulers x clock) seconds of work. Without cp.async it first waits a full
    memory latency for its load (the block reductions make every warp wait for the slowest load);
    ``resident`` programs per SM overlap, so an SM finishes ``resident`` iterations every
    max(resident x compute, latency + compute); with a cp.async pipeline of S stages, every
    max(resident x compute, latency / (S - 1)); a loop that only stores waits for nothing. The loop
    takes at least its bytes (a pass per load and per store) at the achieved bandwidth; its stores
    count only where the phase ``writes_logits`` (in the forward they go to per-row scratch).
    ``extra_instructions``: issued per iteration beside the loop's own (the kernel's straight-line
    code, spread over its iterations): issue slots that other programs' loads overlap.
    """
    warps, resident = kernel["num_warps"], kernel["ctas_per_sm"]
    iterations = tokens * math.ceil(vocab / kernel["BLOCK"]) / device.sms
    passes = bool(loop["global_loads"]) + (writes_logits and bool(loop["global_stores"]))
    floor = passes * tokens * vocab * element_size / (model.achieved_bandwidth * device.bandwidth)
    compute = (loop["instructions"] + extra_instructions) * warps / (model.schedulers_per_sm * model.clock)
    if not loop["global_loads"]:
        wait = compute
    elif loop["cp_async"]:
        wait = model.latency / max(1, kernel["num_stages"] - 1)
    else:
        wait = model.latency + compute
    time = iterations * max(resident * compute, wait) / resident
    bound = "bandwidth" if floor >= time else "issue" if resident * compute >= wait else "latency"
    return max(floor, time), bound


def loop_weights(loops: list[dict[str, Any]], read_passes: float, write_passes: float) -> list[float]:
    """The share of rows that run each loop, from the passes the interpreter counted.

    Loops that load are the passes over the row, taken in address order: each takes one of the
    counted read passes until they are used up, so the loops after the main passes (the head's
    whole-row select, for rows whose candidates overflow) run for no row of the report's random
    logits, and an all-ignored batch (0 reads) runs none. A remainder under 0.1 pass is a gather
    (the target's logit, the head's candidates), not a loop. Loops that only store (the zeros of
    ignored rows' gradient) take the write passes the loading loops leave over; in a phase that
    writes nothing logits-sized (the forward) they write per-row scratch (the head's candidates,
    one iteration per block) and run on the rows that read.
    """
    shares, left = [], read_passes
    for loop in loops:
        share = min(1.0, left) if loop["global_loads"] and left >= 0.1 else 0.0
        left -= share
        shares.append(share)
    storing_only = [loop for loop in loops if not loop["global_loads"] and loop["global_stores"]]
    written = sum(share for loop, share in zip(loops, shares, strict=True) if loop["global_stores"])
    if write_passes == 0:
        store_share = max(shares, default=0.0)
    else:
        store_share = min(1.0, max(0.0, write_passes - written) / len(storing_only)) if storing_only else 0.0
    return [share if loop["global_loads"] else store_share if loop["global_stores"] else 1.0
            for loop, share in zip(loops, shares, strict=True)]


def predict(variant: dict[str, Any], kernels: dict[str, dict], tokens: int, device: Device,
            model: Model) -> dict[str, Any]:
    """Predicted milliseconds of the forward, the backward and both at ``tokens`` rows.

    A phase: the sum over its kernels' loops of ``loop_seconds`` x ``loop_weights``, plus a row
    prologue per launch (the target, then its logit: two dependent loads, overlapped across the
    resident programs); never less than its counted traffic at the achieved bandwidth. A kernel's
    straight-line code (``row_instructions``, every arm counted once: an upper bound) is issued
    once per row: spread over the iterations of the loops its rows run.
    ``bandwidth_fraction``: bytes moved / time / nominal bandwidth; ``fraction_of_limit``: 3 passes
    (one read forward, one read and one write backward) at nominal bandwidth / time.
    """
    element_size, vocab = variant["element_size"], variant["vocab"]
    unit = tokens * vocab * element_size
    out: dict[str, Any] = {}
    for phase in ("forward", "backward"):
        reads, writes = variant["traffic"][f"{phase}_read"], variant["traffic"][f"{phase}_write"]
        loops = [(name, loop) for name in variant["kernels"][phase] for loop in kernels[name]["loops"]]
        weights = variant["loop_weights"][phase]
        running = dict.fromkeys(variant["kernels"][phase], 0.0)  # per kernel: the loops its rows run
        for (name, _), weight in zip(loops, weights, strict=True):
            running[name] += weight
        seconds, bounds = 0.0, {}
        for (name, loop), weight in zip(loops, weights, strict=True):
            kernel = kernels[name]
            extra = (kernel["row_instructions"] / (running[name] * math.ceil(vocab / kernel["BLOCK"]))
                     if running[name] else 0.0)
            time, bound = loop_seconds(kernel, loop, tokens, vocab, element_size, device, model, writes > 0, extra)
            seconds += weight * time
            bounds[bound] = bounds.get(bound, 0.0) + weight * time
        seconds += sum(2 * model.latency * tokens / (device.sms * kernels[name]["ctas_per_sm"])
                       for name in variant["kernels"][phase])
        floor = (reads + writes) * unit / (model.achieved_bandwidth * device.bandwidth)
        out[f"{phase}_ms"] = 1e3 * max(seconds, floor)
        out[f"{phase}_bound"] = "bandwidth" if floor >= seconds or not bounds else max(bounds, key=bounds.get)
    out["total_ms"] = out["forward_ms"] + out["backward_ms"]
    out["bandwidth_fraction"] = variant["traffic"]["total"] * unit / (out["total_ms"] * 1e-3 * device.bandwidth)
    out["fraction_of_limit"] = 3 * unit / device.bandwidth / (out["total_ms"] * 1e-3)
    return out


# --- 4. traffic, and the report -------------------------------------------------------------------------

def measure_traffic(modes: list[str], vocabs: list[int], dtypes: list[str], rows: int) -> dict[tuple, dict]:
    """``precision_ce.bench.traffic`` in a subprocess under the interpreter, by (mode, dtype, vocab)."""
    command = [sys.executable, "-W", "ignore", "-m", "precision_ce.bench.traffic", "--json", "--rows", str(rows),
               "--modes", *modes, "--vocab", *map(str, vocabs), "--dtype", *dtypes]
    result = subprocess.run(command, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                            check=True)
    return {(row["mode"], row["dtype"], row["vocab"]): row for row in json.loads(result.stdout)}


def kernel_summary(launch: Launch, dtype: str, vocab: int) -> tuple[str, dict[str, Any]]:
    """Name of the compiled variant and its resources, loops and launch configuration."""
    flags = "".join(f" {name}" for name, value in launch.kwargs.items() if value is True)
    # V and the row stride: 16-byte aligned rows (128-bit loads) only when V is a multiple of 16.
    name = f"{launch.kernel.__name__} {dtype}{flags}" + ("" if vocab % 16 == 0 else " V%16!=0")
    compiled, attrs = compile_launch(launch)  # cached: the launch configuration as compiled (defaults filled in)
    key = (name, (launch.kwargs["BLOCK"], compiled.metadata.num_warps, compiled.metadata.num_stages))
    if key in _SUMMARIES:
        return _SUMMARIES[key]
    if any(known == name for known, _ in _SUMMARIES):  # the same variant at another BLOCK (a small V)
        name += f" BLOCK={launch.kwargs['BLOCK']}"
    sass = _cubin_tool("nvdisasm", compiled, "-c")
    summary = dict(resources(compiled), num_warps=compiled.metadata.num_warps,
                   num_stages=compiled.metadata.num_stages, BLOCK=launch.kwargs["BLOCK"],
                   aligned_arguments=len([a for a in attrs.values() if a]),
                   loops=sass_loops(sass))
    # Straight-line code, run once per row (every arm counted once: an upper bound).
    summary["row_instructions"] = sass_instruction_count(sass) - sum(loop["instructions"] for loop in summary["loops"])
    summary["ctas_per_sm"] = ctas_per_sm(summary["registers"], summary["num_warps"], summary["shared_bytes"])
    for loop in summary["loops"]:
        loop["per_element"] = loop["instructions"] * 32 * summary["num_warps"] / summary["BLOCK"]
    _SUMMARIES[key] = name, summary
    return name, summary


_SUMMARIES: dict[tuple[str, tuple], tuple[str, dict[str, Any]]] = {}


def report(modes: list[str], vocabs: list[int], dtypes: list[str], tokens: int, rows: int,
           model: Model = Model()) -> dict[str, Any]:
    """Everything the tables show, JSON-ready."""
    traffic = measure_traffic(modes, vocabs, dtypes, rows)
    kernels: dict[str, dict] = {}
    variants = []
    for vocab in vocabs:
        for dtype in dtypes:
            for mode in modes:
                row = {"mode": mode, "dtype": dtype, "vocab": vocab, "element_size": DTYPES[dtype].itemsize,
                       "kernels": {"forward": [], "backward": []}}
                for launch in launches_of(mode, dtype, vocab):
                    name, summary = kernel_summary(launch, dtype, vocab)
                    kernels[name] = summary
                    row["kernels"][launch.phase].append(name)
                row["traffic"] = {key: value for key, value in traffic[(mode, dtype, vocab)].items()
                                  if key not in ("mode", "dtype", "vocab")}
                row["loop_weights"] = {
                    phase: loop_weights(_loops(kernels, row, phase), row["traffic"][f"{phase}_read"],
                                        row["traffic"][f"{phase}_write"]) for phase in ("forward", "backward")}
                row["predicted"] = {device.name: predict(row, kernels, tokens, device, model) for device in DEVICES}
                variants.append(row)
    for dtype in dtypes:
        name, summary = kernel_summary(yardstick_launch(dtype, vocabs[0]), dtype, vocabs[0])
        kernels["yardstick: " + name] = kernels.pop(name, summary)
    return {"tokens": tokens, "traffic_rows": rows,
            "model": dict(dataclasses.asdict(model), devices=[dataclasses.asdict(d) for d in DEVICES]),
            "kernels": kernels, "variants": variants}


def _loops(kernels: dict[str, dict], variant: dict[str, Any], phase: str) -> list[dict[str, Any]]:
    return [loop for name in variant["kernels"][phase] for loop in kernels[name]["loops"]]


def _per_element(data: dict[str, Any], variant: dict[str, Any], phase: str) -> float:
    """Instructions per element of a phase, each loop weighted by the share of rows that run it."""
    loops = _loops(data["kernels"], variant, phase)
    return sum(loop["per_element"] * weight for loop, weight in zip(loops, variant["loop_weights"][phase],
                                                                    strict=True))


def format_report(data: dict[str, Any]) -> str:
    """Two Markdown tables: the compiled kernels, and the variants with traffic and predictions."""
    lines = ["| kernel (sm_90, aligned) | regs | spill B | smem B | warps | BLOCK | CTAs/SM "
             "| instructions per iteration (per element), by pass | per row, outside loops | cp.async | loads |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|"]
    for name, kernel in data["kernels"].items():
        loops = ", ".join(f"{loop['instructions']} ({loop['per_element']:.1f})" for loop in kernel["loops"])
        loads = " ".join(sorted({load for loop in kernel["loops"] for load in loop["global_loads"]}))
        cp_async = "yes" if any(loop["cp_async"] for loop in kernel["loops"]) else "no"
        lines.append(f"| {name} | {kernel['registers']} | {kernel['spill_bytes']} | {kernel['shared_bytes']} "
                     f"| {kernel['num_warps']} | {kernel['BLOCK']} | {kernel['ctas_per_sm']} | {loops} "
                     f"| {kernel['row_instructions']} | {cp_async} | {loads} |")
    devices = [device.name for device in DEVICES]
    last = devices[-1]
    lines += ["", f"Predicted for N = {data['tokens']} tokens, forward + backward; passes counted under the "
              "interpreter; instructions per element summed over the passes (weighted by the rows that run them).", "",
              "| mode | dtype | V | passes fwd | passes bwd | instr/elem fwd | instr/elem bwd | "
              + " | ".join(f"{d} predicted ms" for d in devices) + f" | {last}: % of BW, % of limit | x CE step |",
              "|---|---|---:|---:|---:|---:|---:|" + "---:|" * (len(devices) + 2)]
    cross_entropy = {(v["dtype"], v["vocab"]): v for v in data["variants"] if v["mode"] == "cross_entropy"}
    for variant in data["variants"]:
        predicted = variant["predicted"]
        times = " | ".join(f"{predicted[d]['total_ms']:.2f}" for d in devices)
        baseline = cross_entropy.get((variant["dtype"], variant["vocab"]))
        ratio = f"{predicted[last]['total_ms'] / baseline['predicted'][last]['total_ms']:.2f}" if baseline else "-"
        lines.append(f"| {variant['mode']} | {variant['dtype']} | {variant['vocab']} "
                     f"| {variant['traffic']['forward']:.2f} | {variant['traffic']['backward']:.2f} "
                     f"| {_per_element(data, variant, 'forward'):.1f} | {_per_element(data, variant, 'backward'):.1f} "
                     f"| {times} | {100 * predicted[last]['bandwidth_fraction']:.0f}, "
                     f"{100 * predicted[last]['fraction_of_limit']:.0f} | {ratio} |")
    return "\n".join(lines)


TOOLS = ("scripts/kernel_report.py", "scripts/compile_kernels.py", "precision_ce/bench/traffic.py")
"""Files of this checkout that measure; everything else comes from the revision under report."""


def run_at_revision(rev: str, argv: list[str]) -> int:
    """Re-run this script on ``rev``'s code: its tree from ``git archive``, laid out as the installed
    package (``kernels/`` as ``precision_ce.kernels``), with this checkout's ``TOOLS`` over it."""
    root = Path(__file__).resolve().parents[1]
    argv = [arg for i, arg in enumerate(argv) if arg != "--rev" and (i == 0 or argv[i - 1] != "--rev")
            and not arg.startswith("--rev=")]
    argv = [str(Path(arg).resolve()) if i > 0 and argv[i - 1] in ("--json", "--from-json") and arg != "-"
            else arg for i, arg in enumerate(argv)]
    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(["git", "-C", str(root), "archive", rev], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        for tool in TOOLS:
            (Path(tree) / tool).parent.mkdir(parents=True, exist_ok=True)
            (Path(tree) / tool).write_bytes((root / tool).read_bytes())
        package = Path(tree) / "site"
        package.mkdir()
        (Path(tree) / "precision_ce").rename(package / "precision_ce")
        (Path(tree) / "kernels").rename(package / "precision_ce" / "kernels")
        env = dict(os.environ, PYTHONPATH=str(package))
        # cwd: the tree's root, where no precision_ce/ is left to shadow the laid-out package.
        return subprocess.run([sys.executable, str(Path(tree) / "scripts" / "kernel_report.py"), *argv], env=env,
                              cwd=tree).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--vocab", nargs="+", type=int, default=[128256, 256000])
    parser.add_argument("--tokens", type=int, default=16384, help="N of the predicted step")
    parser.add_argument("--rows", type=int, default=2, help="rows of the interpreter's traffic count")
    parser.add_argument("--achieved-bandwidth", type=float, default=Model.achieved_bandwidth)
    parser.add_argument("--latency-ns", type=float, default=Model.latency * 1e9)
    parser.add_argument("--clock-ghz", type=float, default=Model.clock / 1e9)
    parser.add_argument("--json", metavar="PATH", help="also write the JSON report to PATH ('-': JSON on stdout only)")
    parser.add_argument("--from-json", metavar="PATH", help="print the tables of a saved report (filtered by the "
                        "--modes, --dtypes and --vocab given) instead of measuring")
    parser.add_argument("--rev", help="report the kernels and host code of this git revision (e.g. a branch), "
                        "measured with this checkout's tools (this script, bench/traffic.py)")
    args = parser.parse_args(argv)
    if args.rev:
        return run_at_revision(args.rev, sys.argv[1:] if argv is None else argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        data["variants"] = [v for v in data["variants"]
                            if v["mode"] in args.modes and v["dtype"] in args.dtypes and v["vocab"] in args.vocab]
        used = {name for v in data["variants"] for phase in v["kernels"].values() for name in phase}
        data["kernels"] = {name: kernel for name, kernel in data["kernels"].items()
                           if name in used or (name.startswith("yardstick") and name.split()[2] in args.dtypes)}
        print(format_report(data))
        return 0
    model = Model(achieved_bandwidth=args.achieved_bandwidth, latency=args.latency_ns * 1e-9,
                  clock=args.clock_ghz * 1e9)
    data = report(args.modes, args.vocab, args.dtypes, args.tokens, args.rows, model)
    if args.json == "-":
        print(json.dumps(data, indent=1))
        return 0
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    print(format_report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
