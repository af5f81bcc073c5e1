"""The GPT: a GPT-2 decoder (nanoGPT-style), readable top-down; `build_model` also makes the llama-style
decoder of selfhost.train.gpt.llama (config.arch "llama").

Shapes: B batch, T time (tokens), C n_embd, nh heads, hs = C // nh head size, V vocab.
Exactly llama.cpp's `gpt2` architecture: learned positions, pre-LayerNorm (eps 1e-5) with biases,
fused qkv projection, GELU (tanh approximation), every Linear with a bias, output tied to the embedding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from selfhost.errors import UsageError

LAYER_NORM_EPS = 1e-5


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256  # the context: longest sequence the model sees
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    # the llama-style decoder (arch "llama"; gpt2 ignores these)
    arch: str = "gpt2"
    n_kv_head: int = 0  # grouped-query attention: key/value heads (0: n_head)
    n_ff: int = 0  # SwiGLU hidden width (0: 8/3 n_embd rounded up to a multiple of 32)
    qk_norm: bool = False  # RMSNorm of each query/key head (exported as qwen3)
    tie_embeddings: bool = True  # output matrix = token embedding
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head and self.arch != "gpt2" else self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_width(self) -> int:
        if self.arch == "gpt2":
            return 4 * self.n_embd
        return self.n_ff or math.ceil(8 * self.n_embd / 3 / 32) * 32


def build_model(config: GPTConfig) -> CausalLM:
    """The model of `config.arch`: gpt2 (GPT below) or llama (selfhost.train.gpt.llama.Llama)."""
    if config.arch == "llama":
        from selfhost.train.gpt.llama import Llama

        return Llama(config)
    if config.arch != "gpt2":
        raise UsageError(f"unknown architecture '{config.arch}'", hint="use gpt2 or llama")
    return GPT(config)


class CausalLM(nn.Module):
    """What both architectures share: the config, `forward(idx, targets, cache)` and generation."""

    config: GPTConfig
    wte: nn.Embedding

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def num_params(self, non_embedding: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield one new token id tensor (B, 1) at a time; the context is cropped to block_size.

        With the KV cache each new token costs one position's forward pass while the sequence fits in
        the context; past it, positions shift, so the last block_size tokens are read again each step
        (exactly what the uncached path does, so both give the same tokens)."""
        block = self.config.block_size
        cache = KVCache.empty(self, idx.size(0), idx.device) if use_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= block:
                logits, _ = self(idx[:, cache.length :], cache=cache)  # the new tokens only
            else:
                logits, _ = self(idx[:, -block:])  # (B, <=block_size)
            logits = logits[:, -1, :].float()  # (B, V)
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)  # greedy
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)
            yield nxt


class GPT(CausalLM):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embeddings
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(_init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) and the loss if targets are given. With a `cache`, idx continues the cached
        sequence (positions start at cache.length) and its keys/values are appended to the cache."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise UsageError(
                f"{start + T} tokens do not fit in the model's context of {self.config.block_size}"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layer(i) if cache is not None else None)  # (B, T, C)
        if cache is not None:
            cache.length += T
        x = self.ln_f(x)  # (B, T, C)
        if targets is None:
            return self.lm_head(x), None  # (B, T, V)
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (tied output counted once); nanoGPT leaves position embeddings out of N."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_drop = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        mask, causal = None, True
        if cache is not None and cache.length > 0:  # attend to the cached past + these T tokens
            k, v = cache.append(k, v)  # (B, nh, past + T, hs)
            past = k.size(2) - T
            causal = False  # is_causal aligns to the top-left corner; the mask aligns to the new rows
            if T > 1:  # one new token sees everything: no mask
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        elif cache is not None:
            cache.append(k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )  # (B, nh, T, hs): flash attention where available
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.resid_drop(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = GELUTanh()  # llama.cpp's gelu is the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class GELUTanh(nn.Module):
    """GELU, tanh approximation: 0.5 x (1 + tanh(z)) = x sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3).

    On the CPU the sigmoid form is computed (the same function, within 5e-7 in float32): PyTorch's CPU
    tanh is ~3x slower than its sigmoid (F.gelu's tanh forward + backward: 4.4 ms of a cpu-tiny layer
    in isolation, this one ~2 ms; 2-4% of a whole training step). Elsewhere F.gelu (one GPU kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cpu:
            return F.gelu(x, approximate="tanh")
        if torch.is_grad_enabled() and x.requires_grad:
            return _SigmoidGELU.apply(x)
        c = torch.tensor(_GELU_2C, dtype=x.dtype)
        return x * torch.addcmul(c, x, x, value=_GELU_2C * _GELU_A).mul_(x).sigmoid_()


_GELU_A, _GELU_2C = 0.044715, 2 * math.sqrt(2 / math.pi)


class _SigmoidGELU(torch.autograd.Function):
    """y = x s, s = sigmoid(2z); the forward also computes dy/dx = s + x s (1 - s) d(2z)/dx and keeps
    only it (its backward is one multiply). Seven passes over the activations, the fewest found: the
    tensors are larger than the L2 cache, so each pass costs memory bandwidth."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        c = torch.tensor(_GELU_2C, dtype=x.dtype)
        s = torch.addcmul(c, x, x, value=_GELU_2C * _GELU_A).mul_(x).sigmoid_()  # sigmoid(2z)
        y = x * s
        dz = torch.addcmul(c, x, x, value=3 * _GELU_2C * _GELU_A)  # d(2z)/dx
        ctx.save_for_backward(torch.addcmul(y, y, s, value=-1).mul_(dz).add_(s))  # dy/dx
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (dy_dx,) = ctx.saved_tensors
        return grad * dy_dx


class LayerCache:
    """One layer's keys and values, preallocated for the whole context (no copy per token)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v, self.length = k, v, 0  # (B, nh, block_size, hs)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Every layer's cache plus the number of positions already in it (for generation)."""

    def __init__(self, layers: list[LayerCache]) -> None:
        self.layers, self.length = layers, 0

    @classmethod
    def empty(cls, model: CausalLM, batch: int, device: torch.device) -> KVCache:
        cfg = model.config
        shape = (batch, cfg.kv_heads, cfg.block_size, cfg.head_dim)
        dtype = model.wte.weight.dtype
        return cls([LayerCache(torch.empty(shape, dtype=dtype, device=device),
                               torch.empty(shape, dtype=dtype, device=device))
                    for _ in range(cfg.n_layer)])  # fmt: skip

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
