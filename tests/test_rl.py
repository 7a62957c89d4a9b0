"""``precision-ce rl``: the Pass@k estimator, GRPO's advantages and loss, the verifier, and a quick run."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch

from precision_ce import cli
from precision_ce.causal_lm import TinyCausalLM, sample
from precision_ce.config import RewardConfig
from precision_ce.rl import QUICK, run_experiment
from precision_ce.rl.experiment import reward_config
from precision_ce.rl.grpo import clipped_surrogate_loss, group_advantages
from precision_ce.rl.metrics import default_ks, pass_at_k
from precision_ce.rl.study import run_study
from precision_ce.rl.study_report import bootstrap_interval, format_study_tables, sign_test
from precision_ce.rl.task import (
    CORPUS_KINDS,
    IGNORE_INDEX,
    PROMPT_LEN,
    make_corpus,
    make_task,
    task_from_adjacency,
)

# --- Pass@k -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_brute_force_over_all_k_subsets(n: int) -> None:
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            brute = sum(any(subset) for subset in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_closed_form_for_large_n() -> None:
    # n = 64, c = 3: 1 - C(61, k) / C(64, k), with Python's exact binomials.
    for k in (1, 8, 61, 62, 64):
        exact = 1 - math.comb(61, k) / math.comb(64, k)
        assert pass_at_k(64, 3, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(64, 1, 1) == pytest.approx(1 / 64)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 1, 0), (4, 1, 5), (4, 5, 1), (4, -1, 1)])
def test_pass_at_k_rejects_impossible_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(n, c, k)


def test_default_ks() -> None:
    assert default_ks(64) == [1, 2, 4, 8, 16, 32, 64]
    assert default_ks(48) == [1, 2, 4, 8, 16, 32, 48]
    assert default_ks(1) == [1]


# --- GRPO ---------------------------------------------------------------------------------------


def test_group_advantages_on_hand_worked_groups() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0],   # mean 1/4, sample std 1/2
                            [1.0, 1.0, 0.0, 0.0],   # mean 1/2, sample std sqrt(1/3)
                            [1.0, 1.0, 1.0, 1.0],   # all right: nothing to learn
                            [0.0, 0.0, 0.0, 0.0]])  # all wrong: nothing to learn
    advantages = group_advantages(rewards, eps=0.0)
    s = math.sqrt(3.0) / 2.0  # 0.5 / sqrt(1/3)
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5], [s, s, -s, -s], [0.0] * 4, [0.0] * 4])
    torch.testing.assert_close(advantages[:2], expected[:2])
    assert torch.equal(group_advantages(rewards)[2:], expected[2:])  # eps keeps 0 / 0 away


def test_group_advantages_rejects_groups_of_one() -> None:
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.ones(3, 1))


def test_clipped_surrogate_loss_by_hand() -> None:
    # Two answers; the first has two tokens, the second one (its second position is masked out).
    old = torch.zeros(2, 2)
    new = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.1), 7.0]], requires_grad=True)
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True], [True, False]])
    loss = clipped_surrogate_loss(new, old, advantages, mask, clip=0.2)
    # answer 1: min(1.5, 1.2) and min(0.5, 0.8) -> (1.2 + 0.5) / 2; answer 2: min(-2.2, -2.2) -> -2.2.
    assert loss.item() == pytest.approx(-((1.2 + 0.5) / 2 + -2.2) / 2)
    loss.backward()
    # Clipped terms carry no gradient; unclipped ones d/dlogp (rho A) = rho A, scaled by -1/(|o| B).
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -0.5 * 1.0 / 4], [2.2 / 2, 0.0]]))


def test_on_policy_surrogate_gradient_is_the_policy_gradient() -> None:
    log_probs = torch.randn(3, 4, requires_grad=True)
    advantages = torch.tensor([0.5, -1.0, 2.0])
    mask = torch.ones(3, 4, dtype=torch.bool)
    clipped_surrogate_loss(log_probs, log_probs.detach(), advantages, mask, clip=0.2).backward()
    torch.testing.assert_close(log_probs.grad, -advantages[:, None].expand(3, 4) / 12)


# --- Task and verifier --------------------------------------------------------------------------

# 0 -> 1 -> 2 -> 3, 0 -> 4 -> 3, 3 -> 0; node 5 only reaches 0.
EDGES = [(0, 1), (1, 2), (2, 3), (0, 4), (4, 3), (3, 0), (5, 0)]


@pytest.fixture
def small_task():
    adjacency = torch.zeros(6, 6, dtype=torch.bool)
    for u, v in EDGES:
        adjacency[u, v] = True
    return task_from_adjacency(adjacency, max_answer_len=4, test_prompts=1, generator=torch.Generator().manual_seed(0))


def answers(task, *paths: list[int]) -> torch.Tensor:
    rows = torch.full((len(paths), task.max_answer_len + 1), task.eos)
    for row, path in enumerate(paths):
        rows[row, :len(path)] = torch.tensor(path, dtype=torch.long)
    return rows


def test_verifier_on_known_right_and_wrong_answers(small_task) -> None:
    eos, sep = small_task.eos, small_task.sep
    cases = {  # answer to "0 -> 3" : correct?
        (1, 2, 3): True,
        (4, 3): True,
        (4, 3, 0, 4): False,       # passes through the goal but ends elsewhere
        (1, 2, 3, 0): False,       # ends at 0
        (1, 3): False,             # 1 -> 3 is not an edge
        (2, 3): False,             # 0 -> 2 is not an edge
        (3,): False,               # 0 -> 3 is not an edge
        (): False,                 # empty answer
        (1, 2, sep, 3): False,     # a separator is not a node
    }
    pairs = torch.tensor([[0, 3]]).expand(len(cases), 2)
    got = small_task.verify(pairs, answers(small_task, *map(list, cases)))
    assert got.tolist() == list(cases.values())
    # Walks may revisit nodes; the budget is max_answer_len nodes.
    walk = torch.tensor([[4, 3, 0, 4, 3]])  # 5 nodes, over the budget of 4, and no EOS
    assert not small_task.verify(torch.tensor([[0, 3]]), walk).item()
    assert small_task.verify(torch.tensor([[3, 4]]), answers(small_task, [0, 4])).item()
    no_end = torch.tensor([[1, 2, 3, 0, 4]])  # never emits EOS
    assert not small_task.verify(torch.tensor([[0, 4]]), no_end).item()
    assert answers(small_task, [1, 2, 3])[0, 3].item() == eos


def test_task_prompts_distances_and_split() -> None:
    task = make_task(num_nodes=20, out_degree=3, max_answer_len=6, test_prompts=10, seed=3, min_distance=2)
    assert task.out_degree == 3 and task.vocab_size == 22
    assert (task.adjacency.sum(1) == 3).all() and not task.adjacency.diagonal().any()
    train = {tuple(p) for p in task.train_pairs.tolist()}
    test = {tuple(p) for p in task.test_pairs.tolist()}
    assert len(test) == 10 and not train & test
    for s, g in train | test:
        assert 2 <= task.distance[s, g] <= 5
    # Breadth-first distances agree with a path search: a shortest path of that many edges exists.
    s, g = task.test_pairs[0].tolist()
    reachable = {s}
    for _ in range(int(task.distance[s, g])):
        reachable = {v for u in reachable for v in torch.nonzero(task.adjacency[u]).flatten().tolist()}
    assert g in reachable
    with pytest.raises(ValueError, match="test_prompts"):
        make_task(num_nodes=20, out_degree=3, max_answer_len=6, test_prompts=10_000, seed=3)


def test_corpus_kinds_are_what_they_claim() -> None:
    task = make_task(num_nodes=20, out_degree=3, max_answer_len=6, test_prompts=10, seed=1)
    corpus = make_corpus(task, 2000, mistake_rate=0.3, noise_rate=0.1, seed=2)
    correct = task.verify(corpus.tokens[:, :2], corpus.tokens[:, PROMPT_LEN:])
    kinds = [CORPUS_KINDS[i] for i in corpus.kinds.tolist()]
    assert all(ok for ok, kind in zip(correct.tolist(), kinds, strict=True) if kind == "correct")
    mistakes = ("wrong_turn", "broken_edge")
    assert not any(ok for ok, kind in zip(correct.tolist(), kinds, strict=True) if kind in mistakes)
    shares = corpus.composition()
    assert shares["correct"] == pytest.approx(0.6, abs=0.05) and shares["noise"] == pytest.approx(0.1, abs=0.03)
    # Test prompts never appear in the corpus.
    test = {tuple(p) for p in task.test_pairs.tolist()}
    assert not any(tuple(p) in test for p in corpus.tokens[:, :2].tolist())
    # Only the answer and its first EOS are predicted.
    targets = corpus.targets
    assert (targets[:, :PROMPT_LEN - 1] == IGNORE_INDEX).all()
    predicted = (targets != IGNORE_INDEX).sum(1)
    lengths = (corpus.tokens[:, PROMPT_LEN:] != task.eos).int().argmin(1)
    assert torch.equal(predicted, lengths + 1)


def test_sampling_masks_after_the_end_token() -> None:
    torch.manual_seed(0)
    model = TinyCausalLM(vocab_size=8, max_len=10, dim=16, layers=1, heads=2)
    prompts = torch.randint(0, 6, (64, 3))
    rollout = sample(model, prompts, 6, eos=7, generator=torch.Generator().manual_seed(0))
    answers_ = rollout.answers
    assert answers_.shape == (64, 6) and torch.equal(rollout.tokens[:, :3], prompts)
    for row, mask in zip(answers_.tolist(), rollout.response_mask.tolist(), strict=True):
        end = row.index(7) if 7 in row else 6
        assert mask == [True] * min(end + 1, 6) + [False] * (6 - min(end + 1, 6))
        assert all(token == 7 for token in row[end:])
    assert (rollout.entropy[~rollout.response_mask] == 0).all() and (rollout.entropy[rollout.response_mask] > 0).all()
    again = sample(model, prompts, 6, eos=7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.tokens, rollout.tokens)  # deterministic given the generator


# --- End to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rl")
    code = cli.main(["rl", "--quick", "--presets", "cross_entropy,precision", "--seeds", "0",
                     "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_quick_run_writes_every_file(quick_run: Path) -> None:
    names = ["rl_pass_at_k.csv", "rl_summary.csv", "rl_curves.csv", "rl_runs.csv", "rl_pass_at_k.png", "rl_curves.png"]
    for name in names:
        assert (quick_run / name).stat().st_size > 0, name
    rows = read_csv(quick_run / "rl_summary.csv")
    ks = default_ks(QUICK.eval_samples)
    presets = ("cross_entropy", "precision")
    assert {(r["preset"], r["stage"], int(r["k"])) for r in rows} == {
        (p, s, k) for p in presets for s in ("before", "after") for k in ks}
    for preset in presets:
        for stage in ("before", "after"):
            curve = [float(r["mean"]) for r in rows if r["preset"] == preset and r["stage"] == stage]
            assert all(0.0 <= a <= b <= 1.0 for a, b in itertools.pairwise(curve)), curve  # rises with k
    curves = read_csv(quick_run / "rl_curves.csv")
    assert [int(r["step"]) for r in curves if r["preset"] == "precision"] == list(range(1, QUICK.grpo.steps + 1))
    assert len(read_csv(quick_run / "rl_runs.csv")) == 2


def test_rl_raises_the_reward_of_the_cross_entropy_prior(quick_run: Path) -> None:
    reward = [float(r["reward"]) for r in read_csv(quick_run / "rl_curves.csv") if r["preset"] == "cross_entropy"]
    quarter = len(reward) // 4
    first, last = sum(reward[:quarter]) / quarter, sum(reward[-quarter:]) / quarter
    assert last > first + 0.05, reward
    pass_at_1 = {r["stage"]: float(r["mean"]) for r in read_csv(quick_run / "rl_summary.csv")
                 if r["preset"] == "cross_entropy" and r["k"] == "1"}
    assert pass_at_1["after"] > pass_at_1["before"], pass_at_1


def test_run_experiment_is_deterministic() -> None:
    settings = dataclasses.replace(QUICK, pretrain=dataclasses.replace(QUICK.pretrain, steps=20),
                                   grpo=dataclasses.replace(QUICK.grpo, steps=5))
    first, second = (run_experiment(("precision",), (7,), settings, progress=False).runs[0] for _ in range(2))
    assert first.after == second.after and first.curves == second.curves and first.corpus_ce == second.corpus_ce


def test_cli_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["rl", "--quick", "--presets", "nope"]) == 2
    assert cli.main(["rl", "--quick", "--group-size", "1"]) == 2
    assert cli.main(["rl", "--quick", "--seeds", "a,b"]) == 2
    err = capsys.readouterr().err
    assert "--presets" in err and "--group-size must be >= 2" in err and "--seeds" in err


@pytest.mark.slow
def test_trl_trainer_runs_the_same_pipeline() -> None:
    pytest.importorskip("trl", reason='optional: pip install -e ".[rl-trl]"')
    settings = dataclasses.replace(QUICK, trainer="trl", pretrain=dataclasses.replace(QUICK.pretrain, steps=100),
                                   grpo=dataclasses.replace(QUICK.grpo, steps=6))
    run = run_experiment(("cross_entropy",), (0,), settings, progress=False).runs[0]
    assert len(run.curves.reward) == len(run.curves.entropy) == len(run.curves.length) == 6
    assert all(0.0 <= r <= 1.0 for r in run.curves.reward) and all(e > 0 for e in run.curves.entropy)
    assert 0.0 < run.before.pass_at[1] < 1.0 and run.before.pass_at != run.after.pass_at  # RL changed the model


# --- The study: harder test prompts, knob settings, paired statistics ----------------------------


def test_test_min_distance_holds_out_only_hard_prompts_and_defaults_to_the_old_split() -> None:
    hard = make_task(num_nodes=30, out_degree=3, max_answer_len=7, test_prompts=12, seed=5, min_distance=2,
                     test_min_distance=4)
    assert (hard.distance[hard.test_pairs[:, 0], hard.test_pairs[:, 1]] >= 4).all()
    assert (hard.distance[hard.train_pairs[:, 0], hard.train_pairs[:, 1]] < 4).any()  # easy ones train
    assert not {tuple(p) for p in hard.train_pairs.tolist()} & {tuple(p) for p in hard.test_pairs.tolist()}
    default = make_task(num_nodes=30, out_degree=3, max_answer_len=7, test_prompts=12, seed=5, min_distance=2)
    explicit = make_task(num_nodes=30, out_degree=3, max_answer_len=7, test_prompts=12, seed=5, min_distance=2,
                         test_min_distance=2)
    assert torch.equal(default.test_pairs, explicit.test_pairs)
    assert torch.equal(default.train_pairs, explicit.train_pairs)
    with pytest.raises(ValueError, match="at least 7 apart"):
        make_task(num_nodes=30, out_degree=3, max_answer_len=7, test_prompts=12, seed=5, test_min_distance=7)


def test_reward_config_names() -> None:
    assert reward_config("precision", 3) == RewardConfig(beta=-0.25, k=3)
    assert reward_config("beta=-0.5", 3) == RewardConfig(beta=-0.5, k=3)
    assert reward_config("lambda_tail=-0.2", 4) == RewardConfig(k=4, lambda_tail=-0.2)
    for bad in ("nope", "beta=x", "k=3", "beta=-1"):
        with pytest.raises(ValueError, match="unknown preset or knob setting"):
            reward_config(bad, 3)


def test_sign_test_and_bootstrap_interval() -> None:
    assert sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert sign_test(10, 0) == pytest.approx(2 / 1024) and sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0
    assert bootstrap_interval([2.0] * 10) == (2.0, 2.0)
    low, high = bootstrap_interval([float(i) for i in range(10)])
    assert 2.0 < low < 4.5 < high < 7.0  # around the mean 4.5, inside the range
    assert bootstrap_interval([1.0, 3.0, 2.0]) == bootstrap_interval([1.0, 3.0, 2.0])  # fixed generator


def test_study_pipeline_on_a_tiny_task(tmp_path: Path) -> None:
    settings = dataclasses.replace(QUICK, eval_samples=64, test_min_distance=3,
                                   pretrain=dataclasses.replace(QUICK.pretrain, steps=10),
                                   grpo=dataclasses.replace(QUICK.grpo, steps=2))
    result = run_study((100, 101), settings, out_dir=tmp_path,
                       groups=(("cross_entropy", "precision"), ("beta=-0.5",)))
    assert result.seeds == (100, 101) and len(result.runs) == 6
    tests = read_csv(tmp_path / "rl_study_tests.csv")
    assert {(r["preset"], r["stage"], r["k"]) for r in tests} == {
        (p, s, str(k)) for p in ("precision", "beta=-0.5") for s in ("before", "after") for k in (1, 8, 64)}
    paired = read_csv(tmp_path / "rl_study_paired.csv")
    row = next(r for r in paired if r["preset"] == "precision" and r["seed"] == "101" and r["k"] == "8")
    assert float(row["diff_points"]) == pytest.approx(
        100 * (float(row["pass_at_k"]) - float(row["cross_entropy_pass_at_k"])), abs=1e-3)
    assert {r["seed"] for r in read_csv(tmp_path / "rl_study_pass_at_k.csv")} == {"100", "101"}
    assert (tmp_path / "rl_study_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "beta=-0.5" in format_study_tables(result)
