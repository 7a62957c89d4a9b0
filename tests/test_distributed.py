"""precision_ce.distributed on gloo with 2 and 3 processes: loss, gradient and stats of a vocabulary
shard equal precision_ce.cross_entropy of the gathered logits; communication is O(1) or O(k) per
row; per-rank memory stays within 2.5x the shard. One process group per world size runs every case
(tests/distributed_worker.py) to keep the start-up cost of the processes to two spawns.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from precision_ce import PRESETS
from precision_ce.distributed import vocab_parallel_cross_entropy

SIZES = {2: (7, 12), 3: (5, 9, 4)}
"""Uneven shards: V = 19 and 18, so k = 10 spans several shards and is larger than one."""

TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 1e-2}
"""Relative to max(1, |reference|). 16-bit logits compute in fp32; bf16 results may round one ulp apart."""


def _cases() -> list[dict]:
    cases = []
    for name, reward in PRESETS.items():
        reward_options = {f: getattr(reward, f) for f in ("beta", "lambda_head", "lambda_tail")}
        for reduction in ("mean", "sum", "none"):
            for stats in (False, True):
                cases.append({"name": f"{name}-k10-{reduction}-stats{int(stats)}", "stats": stats,
                              "options": {**reward_options, "k": 10, "reduction": reduction}})
    rank_modes = {"tail": {"lambda_tail": -0.1}, "head": {"lambda_head": 0.1},
                  "both": {"lambda_head": 0.2, "lambda_tail": -0.3}}
    for mode, options in rank_modes.items():
        for k in (1, 3, 10, 15, 18, 100):  # inside one shard, across shards, larger than a shard, >= V
            cases.append({"name": f"ties-{mode}-k{k}", "integer": True, "constant_rows": 2, "stats": True,
                          "options": {**options, "k": k}})
    everything = {"beta": -0.25, "lambda_head": 0.1, "lambda_tail": -0.2, "k": 6, "label_smoothing": 0.1,
                  "z_loss": 1e-3, "softcap": 4.0}
    option_cases = {
        "weight-mean": ({"weight": True}, {"beta": 0.5}),
        "weight-z_loss-mean": ({"weight": True}, {"z_loss": 1e-2, "lambda_tail": -0.1, "k": 4}),
        "weight-z_loss-sum": ({"weight": True}, {"z_loss": 1e-2, "reduction": "sum"}),
        "weight-z_loss-cross_entropy": ({"weight": True}, {"z_loss": 1e-2}),
        "smoothing": ({}, {"label_smoothing": 0.2, "lambda_head": 0.1, "k": 10}),
        "smoothing-weight": ({"weight": True}, {"label_smoothing": 0.2}),
        "softcap": ({}, {"softcap": 2.0, "lambda_tail": -0.1, "k": 3}),
        "focal": ({}, {"beta": -0.5, "positive_reward": "focal"}),
        "ignore_index-3": ({}, {"ignore_index": 3, "lambda_tail": -0.1, "k": 10}),
        "no-ignored-rows": ({"ignore_every": 0}, {"beta": -0.25}),
        "every-option": ({"weight": True, "stats": True}, everything),
        "every-option-none": ({"weight": True, "stats": True}, {**everything, "reduction": "none"}),
        "padding-inf": ({"pad": 3, "stats": True}, {"lambda_tail": -0.1, "k": 5, "softcap": 5.0}),
        "n-d-input": ({"shape": (2, 3, 4), "stats": True}, {"lambda_head": 0.1, "k": 10, "reduction": "none"}),
        "n-d-input-mean": ({"shape": (3, 5)}, {"beta": -0.25}),
        "one-row": ({"shape": (), "ignore_every": 0}, {"lambda_tail": -0.1, "k": 10}),
        "empty": ({"shape": (0,)}, {"lambda_tail": -0.1, "k": 10, "reduction": "sum"}),
        "float32": ({"dtype": torch.float32, "stats": True}, {**everything}),
        "bfloat16": ({"dtype": torch.bfloat16}, {"lambda_tail": -0.1, "k": 10, "z_loss": 1e-3}),
        "bfloat16-autocast": ({"dtype": torch.bfloat16, "autocast": True}, {"beta": -0.25}),
    }
    for name, (case, options) in option_cases.items():
        cases.append({"name": name, **case, "options": options})
    draw = random.Random(11)  # random combinations of every option, the same on every run
    for seed in range(12):
        options = {"beta": draw.choice([0.0, -0.25, 0.5]), "k": draw.randint(1, 21),
                   "lambda_head": draw.choice([0.0, 0.1]), "lambda_tail": draw.choice([0.0, -0.1, -0.3]),
                   "positive_reward": draw.choice(["power", "focal"]), "label_smoothing": draw.choice([0.0, 0.1]),
                   "z_loss": draw.choice([0.0, 1e-3]), "softcap": draw.choice([None, 3.0]),
                   "reduction": draw.choice(["mean", "sum", "none"])}
        cases.append({"name": f"random-{seed}", "seed": seed, "integer": draw.random() < 0.5,
                      "weight": draw.random() < 0.5, "stats": draw.random() < 0.5, "ignore_every": draw.randint(0, 4),
                      "options": options})
    return cases


TRITON_TWINS = (
    "cross_entropy-k10-mean-stats0", "precision-k10-none-stats0", "tail_penalty-k10-mean-stats1",
    "head_reward-k10-sum-stats0", "ties-both-k1", "ties-both-k10", "ties-tail-k15", "weight-z_loss-mean",
    "smoothing-weight", "focal", "ignore_index-3", "every-option", "padding-inf", "n-d-input", "empty", "bfloat16",
)
"""Cases also run on the Triton path (the kernels under the interpreter, blocks of 4 logits): every
preset, ties cut inside a shard and across shards, each option, stats, N-d input, no rows, bf16."""


def _triton_twin(case: dict, block: int = 4) -> dict:
    """The case on backend="triton": fp32 (the kernels take no fp64), bf16 stays bf16."""
    dtype = torch.bfloat16 if _dtype(case) == torch.bfloat16 else torch.float32
    return {**case, "name": f"triton-{case['name']}", "backend": "triton", "dtype": dtype, "block": block}


def _dtype(case: dict) -> torch.dtype:
    return case.get("dtype", torch.float64)


TORCH_CASES = _cases()
CASES = TORCH_CASES + [_triton_twin(c) for c in TORCH_CASES if c["name"] in TRITON_TWINS]
SLOW_CASES = [_triton_twin(c, block) for c in TORCH_CASES if c["name"] not in TRITON_TWINS for block in (8,)]
"""Every other case on the Triton path (pytest -m slow)."""


@functools.cache
def _results(world: int, slow: bool = False) -> list[dict]:
    from distributed_worker import run_group

    if slow:
        return run_group(world, SLOW_CASES, SIZES[world])
    extras = ("errors", "communication", "communication_triton", "memory") if world == 2 else ("errors", "subgroup")
    return run_group(world, CASES, SIZES[world], extras)


def _check_exact(world: int, case: dict, slow: bool = False) -> None:
    tolerance = TOLERANCE[_dtype(case)]
    for rank, records in enumerate(_results(world, slow)):
        record = records["exact"][case["name"]]
        assert record["loss_error"] <= tolerance, (rank, record)
        assert record["grad_error"] <= tolerance, (rank, record)
        assert record["dtype_matches"] and record["shape_matches"], (rank, record)
        assert record["same_on_every_rank"], (rank, record)
        if case.get("stats"):
            assert record["target_rank_equal"], (rank, record)
            for name in ("entropy", "lse", "topk_mass"):
                assert record[f"{name}_error"] <= max(tolerance, 1e-6), (rank, name, record)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_equals_single_process_loss(world: int, case: dict) -> None:
    _check_exact(world, case)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", SLOW_CASES, ids=[c["name"] for c in SLOW_CASES])
def test_triton_path_equals_single_process_loss_every_case(world: int, case: dict) -> None:
    _check_exact(world, case, slow=True)


@pytest.mark.parametrize("world", [2, 3])
def test_bad_input_raises_the_same_error_on_every_rank(world: int) -> None:
    expected = {
        "rows_differ": "ValueError: every rank must pass the same positions",
        "weight_on_some_ranks": "ValueError: pass weight=",
        "target_out_of_range": "ValueError: target holds class index",
        "triton_fp64": "TypeError: backend='triton' takes float32, bfloat16 or float16 logits",
        "probabilities": "TypeError: vocab_parallel_cross_entropy takes class-index targets",
        "wrong_target_shape": "ValueError: target must have shape",
    }
    for rank, records in enumerate(_results(world)):
        for name, start in expected.items():
            assert records["errors"][name].startswith(start), (rank, name, records["errors"][name])


def test_communication_is_o1_or_ok_per_row_never_o_vocab() -> None:
    """Bytes each rank hands to collectives: independent of the shard width, linear in rows, and
    per row at most a handful of numbers (plus k + 1 for the rank modes and stats)."""
    from distributed_worker import COMM_MODES

    itemsize = 4  # fp32 logits
    for rank, records in enumerate(_results(2)):
        for mode, by_size in records["communication"].items():
            options = COMM_MODES[mode]
            ranked = options.get("lambda_head", 0.0) != options.get("lambda_tail", 0.0) or options.get("return_stats")
            narrow, wide, tall = (by_size[size] for size in ((64, 64), (64, 512), (128, 512)))
            assert narrow == wide, (rank, mode, narrow, wide)  # nothing grows with the vocabulary
            assert set(tall[2]) <= {"all_reduce", "all_gather"}, (rank, mode, tall[2])
            assert sum(tall[2].values()) == 3, (rank, mode, tall[2])  # shard sizes + two collectives
            per_row = (sum(tall[0].values()) - sum(wide[0].values())) / 64
            fixed = sum(wide[0].values()) - 64 * per_row
            assert fixed == 4 * 8, (rank, mode, fixed)  # the shard-size all-gather: 4 fp64 per call
            numbers = per_row / itemsize
            if ranked:
                assert numbers <= options["k"] + 1 + 7, (rank, mode, numbers)
            else:
                assert numbers <= 4 + 3, (rank, mode, numbers)


def test_memory_per_rank_within_two_and_a_half_shards() -> None:
    """Peak extra memory of one fwd+bwd (torch.profiler allocator events) / this rank's logits."""
    for rank, records in enumerate(_results(2)):
        for mode, ratio in records["memory"].items():
            # The gradient alone is 1x: less would mean the profiler missed allocations.
            assert 1.0 <= ratio <= 2.5, (rank, mode, ratio)


def test_triton_path_moves_the_same_bytes_as_the_torch_path() -> None:
    """The kernels replace the local passes only: the same collectives, byte for byte."""
    for rank, records in enumerate(_results(2)):
        for mode, by_size in records["communication_triton"].items():
            assert by_size == records["communication"][mode], (rank, mode, by_size)


def test_needs_an_initialised_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))


def test_group_argument_shards_over_a_subgroup() -> None:
    """group= with ranks 1 and 2 of three: exact there; rank 0, outside it, gets a clear error."""
    records = _results(3)
    assert records[0]["subgroup"]["raised"].startswith("this process is not a member of group="), records[0]
    for rank in (1, 2):
        record = records[rank]["subgroup"]
        assert record["loss_error"] <= 1e-9 and record["grad_error"] <= 1e-9, (rank, record)
        assert record["target_rank_equal"], (rank, record)
