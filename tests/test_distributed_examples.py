"""The engine recipes of docs/distributed.md run as documented: ``torchrun --nproc_per_node 2
examples/<file>`` on CPU (gloo), and each step-0 check prints equal numbers (the engine's loss and
the single-device one; torchtitan's and Megatron's own cross-entropy and ours). Slow: each spawns
two training processes for a few seconds (about 15 s each on 2 cores)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAME = r"precision: ours ([\d.]+), single device ([\d.]+)"
PAIRS = {  # example: patterns whose two numbers must be equal, each on some line of the output
    "ddp_train.py": [],
    "fsdp2_train.py": [r"rank 0 step 0: FSDP2 loss ([\d.]+), unsharded model ([\d.]+)",
                       r"rank 1 step 0: FSDP2 loss ([\d.]+), unsharded model ([\d.]+)"],
    "dtensor_tp_train.py": [r"\(Replicate\(\),\) ([\d.]+), single device ([\d.]+)"],
    "torchtitan_loss.py": [r"torchtitan's ([\d.]+), ours ([\d.]+)", SAME],
    "megatron_gpt.py": [r"Megatron's ([\d.]+), ours ([\d.]+)", SAME],
}


@pytest.mark.slow
@pytest.mark.parametrize("example", list(PAIRS))
def test_example_runs_with_torchrun_and_matches_one_device(example: str, tmp_path) -> None:
    if example == "torchtitan_loss.py":
        pytest.importorskip("torchtitan")
    if example == "megatron_gpt.py":
        pytest.importorskip("megatron.core")
    # --standalone: a free rendezvous port, so that a torchrun elsewhere on the machine (the default
    # port 29500) cannot make the two ranks wait for each other forever.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "examples", example)]
    out = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"step +\d+ +loss [\d.]+", out.stdout), out.stdout
    for pattern in PAIRS[example]:
        match = re.search(pattern, out.stdout)
        assert match, (pattern, out.stdout)
        first, second = (float(v) for v in match.groups())
        assert abs(first - second) <= 2e-6 * max(1.0, abs(second)), (example, match.group(0))
