"""A small causal transformer LM and batched sampling from it (the RL task and the real-text demo).

Plain torch (no transformers dependency): a few pre-LayerNorm blocks with causal
``scaled_dot_product_attention``. Sequences are ~10 tokens, so sampling recomputes the whole
prefix at every step instead of keeping a KV cache; that costs less than the cache's bookkeeping
here. Any ``nn.Module`` mapping (B, T) int64 tokens to (B, T, V) logits can replace it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


class CausalBlock(nn.Module):
    """Pre-LN self-attention and MLP, both residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model dim {dim} must be divisible by the number of heads {heads}")
        self.heads = heads
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention_out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, dim = hidden.shape
        q, k, v = self.qkv(self.attention_norm(hidden)).view(batch, length, 3, self.heads, -1).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)
        hidden = hidden + self.attention_out(attended.transpose(1, 2).reshape(batch, length, dim))
        return hidden + self.mlp(self.mlp_norm(hidden))


class TinyCausalLM(nn.Module):
    """Token and position embeddings, ``layers`` causal blocks, a final LayerNorm and the logits."""

    def __init__(self, vocab_size: int, max_len: int, dim: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.max_len = max_len
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(CausalBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.unembedding = nn.Linear(dim, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) int64, T <= max_len -> (B, T, V) next-token logits."""
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds the model's max_len {self.max_len}")
        hidden = self.token_embedding(tokens) + self.position_embedding.weight[: tokens.shape[1]]
        for block in self.blocks:
            hidden = block(hidden)
        return self.unembedding(self.norm(hidden))


@dataclasses.dataclass(frozen=True)
class Rollout:
    """Sampled answers. tokens: (B, P + L) prompt and answer; response_mask: (B, L) bool, the
    sampled tokens up to and including the first EOS; entropy: (B, L) float32, entropy of the
    distribution each token was drawn from (0 outside the mask)."""

    tokens: torch.Tensor
    response_mask: torch.Tensor
    entropy: torch.Tensor

    @property
    def answers(self) -> torch.Tensor:
        """(B, L) the sampled tokens after the prompt."""
        return self.tokens[:, self.tokens.shape[1] - self.response_mask.shape[1]:]


@torch.no_grad()
def sample(model: nn.Module, prompts: torch.Tensor, max_new_tokens: int, eos: int,
           generator: torch.Generator, temperature: float = 1.0) -> Rollout:
    """Sample answers to (B, P) prompts at ``temperature``; finished rows are padded with EOS."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tokens = prompts
    finished = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
    masks, entropies = [], []
    for _ in range(max_new_tokens):
        log_probs = F.log_softmax(model(tokens)[:, -1].float() / temperature, dim=-1)
        probs = log_probs.exp()
        drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
        active = ~finished
        masks.append(active)
        entropies.append(torch.where(active, -(probs * log_probs).sum(-1), 0.0))
        drawn = torch.where(active, drawn, eos)
        tokens = torch.cat([tokens, drawn[:, None]], dim=1)
        finished = finished | (drawn == eos)
    return Rollout(tokens, torch.stack(masks, dim=1), torch.stack(entropies, dim=1))


def token_log_probs(model: nn.Module, tokens: torch.Tensor, num_answer_tokens: int) -> torch.Tensor:
    """(B, T) sequences -> (B, L) log-probabilities of their last L tokens under the model (with grad)."""
    logits = model(tokens[:, :-1])[:, -num_answer_tokens:].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, -num_answer_tokens:, None])[..., 0]
