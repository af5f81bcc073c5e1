"""Real quantization of a real model: SmolLM2-135M dequantized to F16, then Q8_0 / Q4_K_M / Q4_0.

Each output loads in llama.cpp, generates, reports its file type; the quality report orders the
perplexities F16 <= Q8_0 <= Q4_K_M <= Q4_0 on Shakespeare; K-quant fallbacks are counted
(SmolLM2's n_embd is 576, not a multiple of 256).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfhost.cli.app import app
from selfhost.quantize.flow import QuantizeOptions, run_quantize
from selfhost.runtime import gguf_info

pytestmark = pytest.mark.slow
TYPES = ("Q8_0", "Q4_K_M", "Q4_0")


@pytest.fixture(scope="module")
def smol_f16(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    from selfhost.quantize.dequantize import dequantize_gguf

    out = dequantize_gguf(smollm2_gguf, tmp_path_factory.mktemp("smol") / "smollm2-f16.gguf")
    info = gguf_info.inspect(out)
    assert info.quant == "F16" and info.chat_template and info.vocab_size == 49152
    return out


@pytest.fixture(scope="module")
def quantized(smol_f16: Path) -> dict[str, Path]:
    outputs = {}
    for qtype in TYPES:
        out = smol_f16.parent / f"smollm2-{qtype}.gguf"
        run_quantize(str(smol_f16), QuantizeOptions(type=qtype, out=out, threads=2, add_to_store=False))
        outputs[qtype] = out
    return outputs


def test_outputs_report_their_type_load_and_generate(quantized):
    from selfhost.runtime.llama_backend import load_model

    for qtype, path in quantized.items():
        assert gguf_info.inspect(path).quant == qtype
        llm, report = load_model(path, n_ctx=128, n_threads=2)
        out = llm.create_completion("The capital of France is", max_tokens=6, temperature=0.0)
        assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["text"].strip(), qtype
        llm.close()


def test_cli_summary_counts_k_quant_fallbacks(runner, smol_f16):
    result = runner.invoke(app, ["quantize", str(smol_f16), "--type", "Q4_K_M", "--threads", "2"])
    assert result.exit_code == 0, result.output
    # 30 layers x 6 matrices with 576-wide rows (q, k, v, o, gate, up) cannot use 256-blocks
    assert "180 fell back to another type" in result.output
    assert "registered as smollm2-f16:Q4_K_M" in result.output

    from selfhost.models.resolve import resolve_model

    record = resolve_model("smollm2-f16:Q4_K_M").record
    assert record is not None and record.parent == "smollm2-f16" and record.source == "quantized"

    # the registered name works in chat right away, and the quantized model still knows its facts
    question = ["-p", "What is the capital of France?", "--system", "Answer in one short sentence."]
    chat = ["chat", "smollm2-f16:Q4_K_M", *question, "--seed", "7", "-n", "24", "--threads", "1"]
    answer = runner.invoke(app, [*chat, "--ctx", "512", "--no-log", "--json"])
    assert answer.exit_code == 0, answer.output
    reply = json.loads(answer.output[answer.output.index("{") :])
    assert reply["model"] == "smollm2-f16:Q4_K_M" and "Paris" in reply["reply"], reply


def test_perplexity_orders_by_precision(runner, smol_f16, quantized, shared_data):
    text = shared_data / "tinyshakespeare" / "input.txt"
    args = ["compare", str(smol_f16), str(quantized["Q4_0"]), "--text", str(text), "--window", "64"]
    result = runner.invoke(app, [*args, "--chunks", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "reference" in result.output and "Q4_0" in result.output
    assert "window(s) of 64 tokens" in result.output

    from selfhost.events import run_to_end
    from selfhost.quantize.compare import compare

    report = run_to_end(compare(
        [str(smol_f16), *(str(quantized[t]) for t in TYPES)],
        text.read_text()[:40_000], window=256, chunks=3, threads=1, gen_tokens=8,
    ))
    ppl = {row.quant: row.ppl for row in report.rows}
    assert ppl["F16"] <= ppl["Q8_0"] * 1.01 <= ppl["Q4_K_M"] * 1.02 <= ppl["Q4_0"] * 1.03, ppl
    assert 10 < ppl["F16"] < 200  # a real model on real English text
    ref = next(row for row in report.rows if row.reference)
    assert ref.quant == "F16" and all(r.ppl_increase is not None for r in report.rows if not r.reference)
    assert all(r.prompt_tok_s > 0 and r.gen_tok_s > 0 for r in report.rows)
