"""The task: find a path between two nodes of a random directed graph.

A graph is drawn from a seed: ``num_nodes`` nodes, each with ``out_degree`` distinct successors.
A prompt names a start ``s`` and a goal ``g``; a correct answer is any walk ``a_1 ... a_m`` with
``s -> a_1``, ``a_i -> a_{i+1}`` edges of the graph, ``a_m = g`` and ``m <= max_answer_len``,
followed by the end token. Why this task:

* answers are multi-token and checked exactly (the verifier below), like a proof or a program;
* most prompts have several correct answers (different routes), and a model that only knows part
  of the graph's geometry finds one by trying several: exploration matters, so Pass@k grows with k;
* the graph is fixed per seed and only its walks are seen, so a model must compose what it learned
  from other prompts to solve held-out ones (the test prompts are in neither pre-training nor RL).

Token layout of a sequence: ``[s, g, SEP, a_1, ..., a_m, EOS, EOS, ...]``; node ids are their own
tokens, ``SEP = num_nodes``, ``EOS = num_nodes + 1`` (also the padding after the end).

The pre-training corpus mixes demonstrations with plausible mistakes and noise, as web text mixes
good solutions with wrong ones (``make_corpus``).
"""

from __future__ import annotations

import dataclasses
import random

import torch

PROMPT_LEN = 3  # s, g, SEP
IGNORE_INDEX = -100

CORPUS_KINDS: tuple[str, ...] = ("correct", "wrong_turn", "broken_edge", "noise")
"""What a corpus sequence is: a correct path, a valid walk that misses the goal, a path with one
edge that does not exist, or random tokens."""


@dataclasses.dataclass(frozen=True)
class PathTask:
    """A random directed graph and its prompts.

    adjacency: (N, N) bool, adjacency[u, v] is the edge u -> v.
    distance: (N, N) int64, shortest-path length in edges (-1 where unreachable).
    train_pairs / test_pairs: (P, 2) int64 rows (s, g); disjoint.
    """

    adjacency: torch.Tensor
    distance: torch.Tensor
    train_pairs: torch.Tensor
    test_pairs: torch.Tensor
    max_answer_len: int

    @property
    def num_nodes(self) -> int:
        return self.adjacency.shape[0]

    @property
    def sep(self) -> int:
        return self.num_nodes

    @property
    def eos(self) -> int:
        return self.num_nodes + 1

    @property
    def vocab_size(self) -> int:
        return self.num_nodes + 2

    @property
    def sequence_len(self) -> int:
        """Prompt, the longest answer and its end token."""
        return PROMPT_LEN + self.max_answer_len + 1

    @property
    def out_degree(self) -> int:
        """Successors per node (the plausible continuations of a node: the loss's k)."""
        return int(self.adjacency.sum(-1).max())

    def prompts(self, pairs: torch.Tensor) -> torch.Tensor:
        """(P, 2) (s, g) pairs -> (P, 3) prompt tokens ``[s, g, SEP]``."""
        sep = torch.full((pairs.shape[0], 1), self.sep, dtype=torch.long, device=pairs.device)
        return torch.cat([pairs, sep], dim=1)

    def verify(self, pairs: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """Which answers are correct paths. pairs: (B, 2); answers: (B, L) tokens after the prompt.

        An answer is correct when it ends (EOS) after 1 to ``max_answer_len`` nodes, every step is
        an edge starting from s, and the last node is g. Returns (B,) bool.
        """
        if answers.ndim != 2 or pairs.shape != (answers.shape[0], 2):
            raise ValueError(f"pairs must be (B, 2) and answers (B, L); got {tuple(pairs.shape)}, "
                             f"{tuple(answers.shape)}")
        adjacency = self.adjacency.to(answers.device)
        is_eos = answers == self.eos
        has_end = is_eos.any(dim=1)
        length = torch.where(has_end, is_eos.int().argmax(dim=1), answers.shape[1])  # nodes before EOS
        inside = torch.arange(answers.shape[1], device=answers.device) < length[:, None]
        is_node = answers < self.num_nodes
        nodes = answers.clamp(max=self.num_nodes - 1)
        previous = torch.cat([pairs[:, :1], nodes[:, :-1]], dim=1)
        step_ok = is_node & adjacency[previous, nodes]
        last = nodes.gather(1, (length - 1).clamp(min=0)[:, None])[:, 0]
        return (has_end & (length >= 1) & (length <= self.max_answer_len)
                & (step_ok | ~inside).all(dim=1) & (last == pairs[:, 1]))


def make_task(num_nodes: int, out_degree: int, max_answer_len: int, test_prompts: int, seed: int,
              min_distance: int = 2, test_min_distance: int | None = None) -> PathTask:
    """A random graph with ``out_degree`` successors per node; prompts split into train and test.

    Prompts are the pairs (s, g) whose shortest path has ``min_distance`` to ``max_answer_len - 1``
    edges (one edge of slack, so detours of one step still fit), shuffled; ``test_prompts`` of them
    are held out for evaluation, drawn among those at least ``test_min_distance`` edges apart
    (default ``min_distance``: any prompt). A larger ``test_min_distance`` keeps the easy prompts
    for training only: a mix of difficulties for RL, hard prompts for the measurement.
    """
    if not 1 <= out_degree < num_nodes:
        raise ValueError(f"out_degree must be in [1, num_nodes), got {out_degree} with {num_nodes} nodes")
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_nodes, num_nodes, generator=generator)
    scores.fill_diagonal_(-1.0)  # no self-loops
    successors = scores.topk(out_degree, dim=1).indices
    adjacency = torch.zeros(num_nodes, num_nodes, dtype=torch.bool).scatter_(1, successors, True)
    return task_from_adjacency(adjacency, max_answer_len, test_prompts, generator, min_distance, test_min_distance)


def task_from_adjacency(adjacency: torch.Tensor, max_answer_len: int, test_prompts: int,
                        generator: torch.Generator, min_distance: int = 2,
                        test_min_distance: int | None = None) -> PathTask:
    """A task on a given graph (tests build small hand-made ones)."""
    distance = shortest_distances(adjacency)
    s, g = torch.nonzero((distance >= min_distance) & (distance <= max_answer_len - 1), as_tuple=True)
    pairs = torch.stack([s, g], dim=1)
    test_min_distance = min_distance if test_min_distance is None else test_min_distance
    eligible = int((distance[s, g] >= test_min_distance).sum())
    if not 1 <= test_prompts <= min(eligible, pairs.shape[0] - 1):
        raise ValueError(f"test_prompts must be in [1, {min(eligible, pairs.shape[0] - 1)}] (the graph has "
                         f"{pairs.shape[0]} prompts of {min_distance} to {max_answer_len - 1} edges, {eligible} of "
                         f"them at least {test_min_distance} apart), got {test_prompts}")
    pairs = pairs[torch.randperm(pairs.shape[0], generator=generator)]
    # The first test_prompts eligible pairs of the shuffled order are held out; the rest, in order, train.
    eligible_rank = (distance[pairs[:, 0], pairs[:, 1]] >= test_min_distance).long().cumsum(0)
    is_test = (distance[pairs[:, 0], pairs[:, 1]] >= test_min_distance) & (eligible_rank <= test_prompts)
    return PathTask(adjacency, distance, pairs[~is_test], pairs[is_test], max_answer_len)


def shortest_distances(adjacency: torch.Tensor) -> torch.Tensor:
    """(N, N) edges on a shortest path, -1 where unreachable (breadth-first, all sources at once)."""
    n = adjacency.shape[0]
    distance = torch.full((n, n), -1, dtype=torch.long)
    frontier = torch.eye(n, dtype=torch.bool)
    seen = frontier.clone()
    distance[frontier] = 0
    for step in range(1, n):
        frontier = (frontier.float() @ adjacency.float() > 0) & ~seen
        if not frontier.any():
            break
        distance[frontier] = step
        seen |= frontier
    return distance


def simple_paths(task: PathTask, start: int, max_len: int) -> dict[int, list[tuple[int, ...]]]:
    """Every simple path of 1 to ``max_len`` edges from ``start``, grouped by its last node."""
    successors = [torch.nonzero(row).flatten().tolist() for row in task.adjacency]
    by_goal: dict[int, list[tuple[int, ...]]] = {}
    stack: list[tuple[int, ...]] = [(node,) for node in successors[start] if node != start]
    while stack:
        path = stack.pop()
        by_goal.setdefault(path[-1], []).append(path)
        if len(path) < max_len:
            stack.extend((*path, node) for node in successors[path[-1]]
                         if node != start and node not in path)
    return by_goal


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Pre-training sequences: tokens (M, T) int64, loss targets (M, T - 1) int64 (``IGNORE_INDEX``
    except on the answer and its end token), kinds (M,) int64 indices into ``CORPUS_KINDS``."""

    tokens: torch.Tensor
    targets: torch.Tensor
    kinds: torch.Tensor

    def composition(self) -> dict[str, float]:
        """Share of each kind of sequence."""
        counts = torch.bincount(self.kinds, minlength=len(CORPUS_KINDS)).double() / self.kinds.numel()
        return dict(zip(CORPUS_KINDS, counts.tolist(), strict=True))


def make_corpus(task: PathTask, num_sequences: int, mistake_rate: float, noise_rate: float, seed: int,
                detour: int = 1) -> Corpus:
    """Sequences for the train prompts: demonstrations, plausible mistakes and noise.

    A demonstration is a simple path drawn uniformly among those at most ``detour`` edges longer
    than the shortest. With probability ``mistake_rate`` it is replaced by a plausible mistake
    (half: a wrong turn, a valid walk of the same length that misses the goal; half: a broken
    edge, one node of the path swapped for a random node), with probability ``noise_rate`` by
    random node tokens.
    """
    if mistake_rate < 0 or noise_rate < 0 or mistake_rate + noise_rate > 1:
        raise ValueError(f"mistake_rate and noise_rate must be >= 0 with sum <= 1, got {mistake_rate}, {noise_rate}")
    rng = random.Random(seed)
    n, max_len = task.num_nodes, task.max_answer_len
    successors = [torch.nonzero(row).flatten().tolist() for row in task.adjacency]
    paths_from = {start: simple_paths(task, start, max_len) for start in set(task.train_pairs[:, 0].tolist())}
    pairs = task.train_pairs.tolist()
    tokens = torch.full((num_sequences, task.sequence_len), task.eos, dtype=torch.long)
    kinds = torch.zeros(num_sequences, dtype=torch.long)
    for row in range(num_sequences):
        s, g = pairs[rng.randrange(len(pairs))]
        limit = int(task.distance[s, g]) + detour
        path = list(rng.choice([p for p in paths_from[s][g] if len(p) <= limit]))
        draw = rng.random()
        if draw < noise_rate:
            kind = "noise"
            path = [rng.randrange(n) for _ in range(rng.randint(1, max_len))]
        elif draw < noise_rate + mistake_rate / 2:
            kind = "wrong_turn"
            walk = [s]
            for _ in range(len(path)):
                walk.append(rng.choice(successors[walk[-1]]))
            path = walk[1:]
            if path[-1] == g:  # the walk happened to reach the goal: make its last node wrong
                path = [*path[:-1], rng.choice([v for v in range(n) if v != g])]
        elif draw < noise_rate + mistake_rate:
            kind = "broken_edge"
            position = rng.randrange(len(path))
            previous = s if position == 0 else path[position - 1]
            path[position] = rng.choice([v for v in range(n) if not task.adjacency[previous, v] and v != previous])
        else:
            kind = "correct"
        tokens[row, :PROMPT_LEN] = torch.tensor([s, g, task.sep])
        tokens[row, PROMPT_LEN:PROMPT_LEN + len(path)] = torch.tensor(path)
        kinds[row] = CORPUS_KINDS.index(kind)
    return Corpus(tokens, answer_targets(tokens, task.eos), kinds)


def answer_targets(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """Next-token targets of (M, T) sequences with everything but the answer and its first EOS ignored."""
    targets = tokens[:, 1:].clone()
    position = torch.arange(targets.shape[1])
    after_end = (targets == eos).int().cumsum(dim=1) - (targets == eos).int() > 0  # strictly after the first EOS
    targets[(position < PROMPT_LEN - 1).expand_as(targets) | after_end] = IGNORE_INDEX
    return targets
