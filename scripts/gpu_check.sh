#!/usr/bin/env bash
# One prepared GPU check: install, run the test suite on CUDA (compiled kernels), run the
# benchmarks, write everything under OUT_DIR as it goes. Steps run in order of importance, each under
# its own timeout (15.5 minutes in all, more than one device call allows: a call cut short still
# returns what the steps before it wrote). Not yet run on a GPU.
#   Usage: scripts/gpu_check.sh OUT_DIR
#   On the device tool: run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=540)
# Peers for the side-by-side (e.g. liger-kernel) travel as wheels in .whl/ (see docs/benchmarks.md).
set -uo pipefail
out="${1:?usage: scripts/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }

# Tests: CUDA present, so conftest does not set TRITON_INTERPRET and the kernels compile.
# tests/test_pytorch.py: Inductor with the triton_ops, opcheck, CUDA graphs, reduce-overhead, determinism.
timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernel.py tests/test_properties.py \
    tests/test_reference.py tests/test_bench.py tests/test_linear.py tests/test_pytorch.py 2>&1 \
    | tee "$out/tests.log" | tail -n 15
tests_status=${PIPESTATUS[0]}
# The vocab-parallel loss: gloo ranks on the one GPU; its Triton cases run the compiled kernels on CUDA tensors.
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_distributed.py 2>&1 | tee "$out/tests_distributed.log" | tail -n 5
[ "${PIPESTATUS[0]}" -eq 0 ] || tests_status=1

timeout 180 python3 -m precision_ce.cli bench --device cuda --linear-shapes none --out "$out/bench" 2>&1 \
    | tee "$out/bench.log" | tail -n 60
bench_status=${PIPESTATUS[0]}

# Fused linear + loss at the issue's target shape (bf16, N 16384, D 4096, V 128256), with Liger's and
# cut-cross-entropy's fused losses when their wheels are in .whl/.
timeout 120 python3 -m precision_ce.cli bench --device cuda --shapes none --linear-shapes 16384x4096x128256 \
    --linear-presets cross_entropy,precision,tail_penalty --out "$out/bench_linear" 2>&1 \
    | tee "$out/bench_linear.log" | tail -n 30
[ "${PIPESTATUS[0]}" -eq 0 ] || bench_status=1

# torch.compile: first-call time and compiled speed against torch.compile(F.cross_entropy), then of the
# fused linear + loss against torch.compile(F.linear + F.cross_entropy) (docs/pytorch.md).
timeout 90 python3 scripts/bench_compile.py --device cuda --dtype bfloat16 --rows 8192 --vocab 128256 --repeats 3 \
    --out "$out/compile.csv" 2>&1 | tee "$out/compile.log" | tail -n 5
timeout 90 python3 scripts/bench_compile.py --device cuda --dtype bfloat16 --rows 8192 --hidden 4096 --vocab 128256 \
    --repeats 3 --out "$out/compile_linear.csv" 2>&1 | tee "$out/compile_linear.log" | tail -n 8

echo "tests exit $tests_status, bench exit $bench_status" | tee -a "$out/env.txt"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
