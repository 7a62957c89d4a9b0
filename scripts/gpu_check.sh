#!/usr/bin/env bash
# One prepared GPU check, steps in order of importance, each under its own timeout:
#   first (about two minutes): correctness at the production shape (scripts/production_check.py:
#     every mode at 16384 x 128256 bf16, misaligned targets, ignored rows, return_stats="full" and
#     inplace_backward=True (its gradient must land in the logits' buffer), against the torch backend
#     and F.cross_entropy) and the headline benchmark (cross-entropy and tail_penalty against
#     F.cross_entropy, torch.compile of it and Liger at 16384 x 128256 bf16; the fused linear path at
#     D 4096 against F.linear + F.cross_entropy and the peers' fused losses); a summary;
#   then: the test suite on CUDA (compiled kernels), the full benchmark grid, torch.compile timings;
#   last: the one-screen summary (scripts/gpu_summary.py).
# Everything is written to a work folder and packed into OUT_DIR/gpu_check.tar.gz after every step,
# with OUT_DIR/summary.txt (the device tool returns at most 8 files; a call cut short by its limit
# still returns what the steps before it wrote). The whole takes ~15 minutes, more than one device
# call allows: the first steps fit any call.
#   Usage: scripts/gpu_check.sh OUT_DIR
#          scripts/gpu_check.sh --dry-run OUT_DIR   # no GPU: CPU, tiny shapes, the interpreter; checks the plumbing
#   On the device tool: run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=540)
# Peers for the side-by-side (e.g. liger-kernel) travel as wheels in .whl/ (see docs/benchmarks.md).
set -uo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
out="${1:?usage: scripts/gpu_check.sh [--dry-run] OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"

if [ "$dry_run" -eq 1 ]; then
    export TRITON_INTERPRET=1
    device=cpu; tokens=6; vocab=1000; shape=64x1000; linear_shape=64x32x1000; hidden=32; dtype_long=float32
    compile_rows=16
    tests=(--collect-only -q); repeats=1
else
    device=cuda; tokens=16384; vocab=128256; shape=16384x128256; linear_shape=16384x4096x128256; hidden=4096
    dtype_long=bfloat16; tests=(-q -x); repeats=3; compile_rows=8192
fi

pack() {
    "$python" scripts/gpu_summary.py "$work" > "$work/summary.txt" 2>&1
    cp "$work/summary.txt" "$out/summary.txt"
    tar czf "$out/gpu_check.tar.gz" -C "$work" .
}

# step NAME TIMEOUT_S COMMAND...: its output to NAME.log (and the screen's tail), status to steps.tsv.
step() {
    local name="$1" limit="$2" start=$SECONDS
    shift 2
    echo "== $name (timeout ${limit} s)"
    timeout -k 10 "$limit" "$@" > "$work/$name.log" 2>&1
    local status=$?
    tail -n 25 "$work/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$work/steps.tsv"
    pack
    return $status
}

{
    date -u
    if [ "$dry_run" -eq 1 ]; then echo "dry run: CPU, Triton interpreter, tiny shapes"
    else nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; fi
    "$python" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} > "$work/env.txt" 2>&1
cat "$work/env.txt"

if [ "$dry_run" -eq 0 ]; then
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH=/tmp/site
    fi
    step install 120 "$python" -m pip install -q --no-deps --no-build-isolation -e . || { cat "$work/install.log"; exit 1; }
fi

# --- The first two minutes: correctness at the production shape, then the headline numbers. ---
step production_check 100 "$python" scripts/production_check.py --device "$device" --tokens "$tokens" \
    --vocab "$vocab" --dtype bf16 --out "$work/production_check.json"
check_status=$?
step headline 90 "$python" -m precision_ce.cli bench --device "$device" --shapes "$shape" --dtype bf16 \
    --presets cross_entropy,tail_penalty --compile-presets none --linear-shapes none --repeats "$repeats" \
    --max-candidate-seconds 5 --no-figures --no-progress --out "$work/headline"
bench_status=$?
step headline_linear 60 "$python" -m precision_ce.cli bench --device "$device" --shapes none \
    --linear-shapes "$linear_shape" --linear-presets cross_entropy,tail_penalty --no-compile --dtype bf16 \
    --repeats "$repeats" --max-candidate-seconds 5 --no-figures --no-progress --out "$work/headline_linear"
[ $? -eq 0 ] || bench_status=1
cat "$work/summary.txt"

# --- The rest. Tests: CUDA present, so conftest does not set TRITON_INTERPRET and the kernels compile.
# tests/test_pytorch.py: Inductor with the triton_ops, opcheck, CUDA graphs, reduce-overhead, determinism.
step tests 300 "$python" -m pytest "${tests[@]}" -p no:cacheprovider tests/test_kernel.py tests/test_properties.py \
    tests/test_reference.py tests/test_bench.py tests/test_linear.py tests/test_pytorch.py tests/test_traffic.py
tests_status=$?
# The vocab-parallel loss: gloo ranks on the one GPU; its Triton cases run the compiled kernels on CUDA tensors.
step tests_distributed 150 "$python" -m pytest "${tests[@]}" -p no:cacheprovider tests/test_distributed.py
[ $? -eq 0 ] || tests_status=1

if [ "$dry_run" -eq 1 ]; then grid=(--shapes "$shape" --dtype bf16 --presets cross_entropy,precision); else grid=(); fi
step bench 180 "$python" -m precision_ce.cli bench --device "$device" "${grid[@]}" --linear-shapes none \
    --no-progress --out "$work/bench"
[ $? -eq 0 ] || bench_status=1
# The fused linear + loss at more presets, with the compiled baseline this time.
step bench_linear 120 "$python" -m precision_ce.cli bench --device "$device" --shapes none \
    --linear-shapes "$linear_shape" --linear-presets cross_entropy,precision,tail_penalty --dtype bf16 \
    --repeats "$repeats" --no-progress --out "$work/bench_linear"
[ $? -eq 0 ] || bench_status=1

# torch.compile: first-call time and compiled speed against torch.compile(F.cross_entropy), then of the
# fused linear + loss against torch.compile(F.linear + F.cross_entropy) (docs/pytorch.md).
step compile 90 "$python" scripts/bench_compile.py --device "$device" --dtype "$dtype_long" --rows "$compile_rows" \
    --vocab "$vocab" --repeats "$repeats" --out "$work/compile.csv"
step compile_linear 90 "$python" scripts/bench_compile.py --device "$device" --dtype "$dtype_long" \
    --rows "$compile_rows" --hidden "$hidden" --vocab "$vocab" --repeats "$repeats" --out "$work/compile_linear.csv"

echo "production check exit $check_status, tests exit $tests_status, bench exit $bench_status" | tee -a "$work/env.txt"
pack
cat "$work/summary.txt"
rm -rf "$work"
[ "$check_status" -eq 0 ] && [ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
