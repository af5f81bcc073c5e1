"""Perplexity against a true full-precision reference: a selfhost GPT exported in F32.

The scored text is sampled from the F32 model itself (real Shakespeare as context, the scored half of
every window drawn from the model's own softmax), so the F32 model is the text's true distribution
and any quantization can only raise the expected perplexity: ppl(q) / ppl(F32) - 1 estimates
KL(F32 || q). The margins of the strict steps below were sized from repeated runs (seeds 0-5, see
MEASURED) at half the smallest gap seen. The F32 perplexity is also recomputed in PyTorch over the
same windows, which catches an off-by-one between logits and targets.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from selfhost.events import run_to_end  # noqa: E402
from selfhost.quantize.flow import QuantizeOptions, run_quantize  # noqa: E402
from selfhost.quantize.perplexity import perplexity  # noqa: E402
from selfhost.train.gpt.export import write_gguf  # noqa: E402
from selfhost.train.gpt.model import GPT, GPTConfig  # noqa: E402
from selfhost.train.gpt.tokenizer import CharTokenizer  # noqa: E402

pytestmark = pytest.mark.needs_model
WINDOW, WINDOWS = 64, 128
TYPES = ("F32", "Q8_0", "Q5_0", "Q4_0")  # decreasing precision (bits per weight 32, 8.5, 5.5, 4.5)
# relative perplexity increase of each type over the previous one, smallest seen over seeds 0-5
# (seed: Q8_0, Q5_0, Q4_0) 0: .0048 .075 .190  1: .0023 .053 .096  2: .0023 .079 .194
# 3: .0031 .089 .224  4: .0021 .077 .222  5: .0069 .077 .216; the F32 run is deterministic
MEASURED = {"Q8_0": 0.0021, "Q5_0": 0.053, "Q4_0": 0.096}
MARGIN = {t: gap / 2 for t, gap in MEASURED.items()}


def sampled_windows(model: GPT, context: torch.Tensor, eot: int, seed: int) -> torch.Tensor:
    """(WINDOWS, WINDOW) tokens: BOS, real text up to the scored half, then the model's own samples."""
    first = WINDOW // 2
    ids = context[: WINDOWS * first].view(WINDOWS, first).clone()
    ids[:, 0] = eot  # what perplexity() puts first (the exported GPT adds BOS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        while ids.shape[1] < WINDOW:
            logits = model(ids)[0][:, -1].double()
            logits[:, eot] = -math.inf  # the text cannot hold <|endoftext|>
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)], 1)
    return ids


def quantized_perplexities(tmp_path: Path, text: str, seed: int) -> tuple[dict[str, float], float]:
    tok = CharTokenizer.train([text])
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=WINDOW, n_layer=2, n_head=4, n_embd=128))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # peaked predictions: quantization noise shows in the NLL
    model.eval()
    windows = sampled_windows(model, torch.tensor(tok.encode(text[:20_000])), tok.eot_id, seed)
    placeholder = tok.encode("\n")[0]  # perplexity() replaces each window's first token with BOS
    sample = "".join(tok.decode([placeholder, *w[1:].tolist()]) for w in windows)
    assert len(tok.encode(sample)) == WINDOWS * WINDOW

    with torch.no_grad():  # PyTorch's perplexity over the same windows: rows j predict token j + 1
        logp = torch.log_softmax(model(windows)[0].double(), -1)
    first = WINDOW // 2
    nll = -logp[:, first : WINDOW - 1].gather(2, windows[:, first + 1 :, None]).mean()

    paths = {"F32": write_gguf(tmp_path / "g.f32.gguf", model.state_dict(), model.config.to_dict(), tok,
                               name="g", dtype="f32")}  # fmt: skip
    for qtype in TYPES[1:]:
        paths[qtype] = tmp_path / f"g.{qtype}.gguf"
        run_quantize(
            str(paths["F32"]), QuantizeOptions(type=qtype, out=paths[qtype], threads=2, add_to_store=False)
        )
    ppl = {t: run_to_end(perplexity(p, sample, window=WINDOW, threads=2, gen_tokens=0)).ppl
           for t, p in paths.items()}
    return ppl, math.exp(float(nll))


@pytest.mark.slow
def test_perplexity_rises_strictly_with_less_precision_and_f32_matches_pytorch(tmp_path, shared_data):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text("utf-8")
    ppl, torch_ppl = quantized_perplexities(tmp_path, text, seed=0)
    assert ppl["F32"] == pytest.approx(torch_ppl, rel=1e-4), (ppl, torch_ppl)
    for lower, higher in zip(TYPES, TYPES[1:], strict=False):
        assert ppl[higher] > ppl[lower] * (1 + MARGIN[higher]), (higher, ppl)
