"""Generate text from a PyTorch checkpoint (no GGUF needed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from selfhost.errors import UsageError
from selfhost.events import Notice
from selfhost.train.common import pick_device, resolve_threads
from selfhost.train.gpt import checkpoint, tokenizer


def generate(
    ckpt_path: Path,
    prompt: str = "",
    *,
    max_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int | None = None,
    device: str = "auto",
    use_cache: bool = True,
) -> Iterator[Notice | str]:
    """Yield text pieces as they are generated (the prompt is not repeated). Prompt characters the
    model never saw are dropped: a warning Notice (count and examples) comes before the first piece."""
    if max_tokens < 0:
        raise UsageError("--max-tokens must be 0 or more")
    if top_k is not None and top_k < 1:
        raise UsageError("--top-k must be 1 or more")
    dev = pick_device(device)
    resolve_threads(0, dev)  # on a busy CPU, fewer threads are faster
    ckpt = checkpoint.load(ckpt_path)
    tok = tokenizer.from_json(ckpt["tokenizer"])
    model = checkpoint.model_from_checkpoint(ckpt, dev)
    gen = torch.Generator(device=dev)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    unseen = tok.unseen(prompt)
    if unseen.total:
        yield Notice(f"note: {unseen.describe('the prompt')}", "warning")
    prompt_ids = tok.encode(prompt)
    idx = torch.tensor([[tok.eot_id, *prompt_ids]], dtype=torch.long, device=dev)
    ids: list[int] = []
    shown = ""
    for nxt in model.generate(idx, max_tokens, temperature, top_k, generator=gen, use_cache=use_cache):
        token = int(nxt)
        if token == tok.eot_id:
            break
        ids.append(token)
        text = tok.decode(ids)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            continue
        yield text[len(shown) :]
        shown = text
