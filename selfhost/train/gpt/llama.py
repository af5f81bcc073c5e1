"""The llama-style decoder: rotary positions, RMSNorm, SwiGLU MLP, no biases, grouped-query attention,
optional QK-norm (RMSNorm of each query/key head) and an optional untied output matrix.

Exactly llama.cpp's `llama` architecture (or `qwen3` with QK-norm), so exported GGUFs compute the same
logits. Rotary positions use the half-split ("NeoX", Hugging Face) layout; llama.cpp's `llama` reads
interleaved pairs, so export permutes the query/key rows (and import from a llama GGUF undoes it).
Shapes: B batch, T time, C n_embd, nh / nkv query / key-value heads, hs head size, F ffn width, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

from selfhost.errors import UsageError
from selfhost.train.gpt.model import CausalLM, GPTConfig, KVCache, LayerCache


class Llama(CausalLM):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.n_head % config.kv_heads:
            raise UsageError(f"n_kv_head ({config.kv_heads}) must divide n_head ({config.n_head})")
        if config.head_dim % 2:
            raise UsageError(f"the head size ({config.head_dim}) must be even for rotary positions")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([LlamaBlock(config) for _ in range(config.n_layer)])
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        cos, sin = rotary_tables(config.block_size, config.head_dim, config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)  # (block_size, hs/2)
        self.register_buffer("sin", sin, persistent=False)
        self.score_only_targets = False  # chat fine-tuning: most positions have no target
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0.02) matrices and embeddings; the residual projections (attention output, MLP down) start
        at zero, so each block starts as the identity (modded-nanogpt's init: on cpu-tiny val loss 1.713 vs
        1.720 after 1000 steps, 0.01-0.02 lower from step 600 on; bench/train_gpt.py, README)."""
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            if name.endswith(("o_proj.weight", "down.weight")):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) and, with targets (-1: not scored), the mean loss; `cache` as in GPT."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise UsageError(
                f"{start + T} tokens do not fit in the model's context of {self.config.block_size}"
            )
        rope = (self.cos[start : start + T], self.sin[start : start + T])
        x = self.drop(self.wte(idx))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache.layer(i) if cache is not None else None)
        if cache is not None:
            cache.length += T
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x), None  # (B, T, V)
        if self.training and self.score_only_targets:  # the head's matmul only where a loss is taken
            keep = targets.view(-1) >= 0
            logits = self.lm_head(x.view(-1, x.size(-1))[keep])  # (N, V)
            return logits, F.cross_entropy(logits.float(), targets.view(-1)[keep])
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        return logits, loss


def rotary_tables(n_pos: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position p times frequency theta^(-2i/hs), (n_pos, hs/2) each."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (first half, second half) pairs of each head: x (B, h, T, hs), cos/sin (T, hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaBlock(nn.Module):
    """x + attn(rmsnorm(x)), then x + swiglu(rmsnorm(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = LlamaAttention(config)
        self.ffn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: LayerCache | None = None) -> torch.Tensor:  # fmt: skip
        x = x + self.attn(self.attn_norm(x), rope, cache)
        return x + self.mlp(self.ffn_norm(x))


class LlamaAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.hs = config.n_head, config.kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.hs, bias=False)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv * self.hs, bias=False)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv * self.hs, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hs, config.n_embd, bias=False)
        self.q_norm = nn.RMSNorm(self.hs, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.hs, eps=config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: LayerCache | None = None) -> torch.Tensor:  # fmt: skip
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        mask, causal = None, True
        if cache is not None and cache.length > 0:
            k, v = cache.append(k, v)
            past = k.size(2) - T
            causal = False
            if T > 1:
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        elif cache is not None:
            cache.append(k, v)
        if self.n_kv != self.n_head:  # each key/value head serves n_head / n_kv query heads
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.hs)
        return self.resid_drop(self.o_proj(y))


class SwiGLU(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.ffn_width, bias=False)
        self.up = nn.Linear(config.n_embd, config.ffn_width, bias=False)
        self.down = nn.Linear(config.ffn_width, config.n_embd, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.silu(self.gate(x)) * self.up(x)))  # (B, T, C) -> (B, T, F) -> (B, T, C)
