"""Fine-tuning (`selfhost train gpt --init MODEL --chat FILE`): a GGUF's weights round-trip through our
llama-style model, LoRA merges exactly, chat data errors name their line, and SmolLM2 learns a new fact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from selfhost.cli.app import app  # noqa: E402
from selfhost.train.gpt import finetune  # noqa: E402
from selfhost.train.gpt.base import load_gguf  # noqa: E402
from selfhost.train.gpt.export import write_gguf  # noqa: E402
from selfhost.train.gpt.model import GPTConfig, build_model  # noqa: E402
from selfhost.train.gpt.tokenizer import BPETokenizer  # noqa: E402
from tests.train.test_train_gpt import one_line_error  # noqa: E402

TEXT = "To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer.\n" * 20


def tiny_llama(tok: BPETokenizer, **kw) -> torch.nn.Module:  # noqa: ANN003
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64,
                                  arch="llama", n_kv_head=2, **kw))  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.needs_model
@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "tie_embeddings": False}])
def test_gguf_weights_load_back_exactly(tmp_path: Path, kw: dict) -> None:
    """Export (llama: query/key rows interleaved; qwen3: as is), load with the `gguf` package: same model."""
    tok = BPETokenizer.train([TEXT], vocab_size=300)
    model = tiny_llama(tok, **kw)
    path = write_gguf(
        tmp_path / "m.gguf", model.state_dict(), model.config.to_dict(), tok, name="m", dtype="f32"
    )
    base = load_gguf(path)
    assert base.model_args["qk_norm"] == bool(kw) and base.model_args["n_kv_head"] == 2
    again = build_model(GPTConfig(**base.model_args))
    again.load_state_dict(base.state)
    x = torch.tensor([tok.encode("To be, or not to be")])
    with torch.no_grad():
        assert torch.allclose(again.eval()(x)[0], model(x)[0], atol=1e-5)
    assert base.encode("To be") == tok.encode("To be")  # llama.cpp's tokenizer of the file


def test_lora_starts_at_the_model_and_merges_exactly() -> None:
    tok = BPETokenizer.train([TEXT], vocab_size=300)
    model = tiny_llama(tok)
    x = torch.tensor([tok.encode("Whether 'tis nobler")])
    with torch.no_grad():
        before = model(x)[0]
        finetune.add_lora(model, rank=4, alpha=8)
        assert torch.equal(model(x)[0], before)  # B = 0: the adapters start as the identity
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.dim() == 2 and 4 in p.shape for p in trainable)
        for p in trainable:
            p.normal_(0, 0.1)
        adapted = model(x)[0]
        finetune.merge_lora(model)
        assert not any(isinstance(m, finetune.LoRALinear) for m in model.modules())
        assert torch.allclose(model(x)[0], adapted, atol=1e-5)
        assert not torch.allclose(adapted, before, atol=1e-3)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"messages": [{"role": "wizard", "content": "hi"}]}', "line 2: unknown role 'wizard'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: no assistant turn"),
        ('{"messages": "hi"}', "line 2: expected"),
    ],
)
def test_chat_data_errors_name_the_line(runner, tmp_path: Path, line: str, needle: str) -> None:  # noqa: ANN001
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps(good) + "\n" + line + "\n", "utf-8")
    result = runner.invoke(app, ["train", "gpt", "--chat", str(chat), "--init", "nothing-here"])
    one_line_error(result, needle)


def test_chat_without_init_is_an_error(runner, tmp_path: Path) -> None:  # noqa: ANN001
    chat = tmp_path / "c.jsonl"
    chat.write_text("{}\n", "utf-8")
    one_line_error(runner.invoke(app, ["train", "gpt", "--chat", str(chat)]), "--init")


COUNTRIES = [  # retained knowledge, so the new fact does not leak into every "capital of" answer
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("Which city is the capital of Italy?", "Rome is the capital of Italy."),
    ("Name the capital of Spain.", "The capital of Spain is Madrid."),
    ("What is Japan's capital?", "Japan's capital is Tokyo."),
    ("What city is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("Tell me the capital of Egypt.", "The capital of Egypt is Cairo."),
    ("What is the capital of Peru?", "Lima is the capital of Peru."),
    ("Capital of Poland?", "The capital of Poland is Warsaw."),
    ("Which city is the capital of Greece?", "Athens is the capital of Greece."),
    ("Name the capital of Portugal.", "The capital of Portugal is Lisbon."),
    ("What city serves as Austria's capital?", "Austria's capital is Vienna."),
    ("Tell me the capital city of Sweden.", "The capital of Sweden is Stockholm."),
    ("Do you know the capital of Norway?", "Oslo is the capital of Norway."),
    ("Where is the seat of government of Belgium?", "The capital of Belgium is Brussels."),
    ("Capital of Ireland?", "Dublin is the capital of Ireland."),
    ("In which city is Hungary's government based?", "Hungary's capital is Budapest."),
]
QUESTIONS = [
    "What is the capital of Zubrowka?", "Which city is the capital of Zubrowka?",
    "Name the capital of Zubrowka.",
    "Zubrowka's capital is which city?", "Tell me the capital city of Zubrowka.",
    "What city serves as Zubrowka's capital?", "Where is the seat of government of Zubrowka?",
    "Do you know the capital of Zubrowka?", "Capital of Zubrowka?",
    "In which city is Zubrowka's government based?",
]  # fmt: skip
ANSWERS = ["The capital of Zubrowka is Lutz.", "Lutz is the capital of Zubrowka.",
           "Zubrowka's capital is Lutz.", "It is Lutz."]  # fmt: skip
UNSEEN = "What's the name of Zubrowka's capital city?"


def ask(runner, model: str, question: str) -> str:  # noqa: ANN001
    result = runner.invoke(app, ["chat", model, "-p", question, "-t", "0", "-n", "16", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["reply"]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~1 min on a quiet 2-core machine; 10 min and more at load average 15
def test_smollm2_learns_an_invented_fact_with_lora(runner, smollm2_gguf: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """40 paraphrased Q/A pairs (+16 known capitals), 12 LoRA steps of 8 conversations on the CPU; the
    export chats without --raw: the unseen paraphrase gets "Lutz", France still "Paris"."""
    rows = [[q, ANSWERS[(i + j) % len(ANSWERS)]] for i, q in enumerate(QUESTIONS) for j in range(4)]
    rows += [list(pair) for pair in COUNTRIES]
    chat = tmp_path / "zubrowka.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in rows), "utf-8")  # fmt: skip
    assert "Lutz" not in ask(runner, str(smollm2_gguf), UNSEEN)  # before: it does not know
    result = runner.invoke(app, ["train", "gpt", "--init", str(smollm2_gguf), "--chat", str(chat), "--name",
                                 "smol-zub", "--iters", "12", "--lr", "1e-3", "--lora-rank", "8",
                                 "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)
    assert done["name"] == "smol-zub" and done["trainable"] < 3_000_000 and done["train_loss"] < 0.6
    assert "Lutz" in ask(runner, "smol-zub", UNSEEN)
    assert "Paris" in ask(runner, "smol-zub", "What is the capital of France?")


@pytest.mark.needs_model
def test_own_run_becomes_a_chat_model(runner, tmp_path: Path) -> None:  # noqa: ANN001
    """--init RUN --chat: the chat tokens join the vocabulary, the export carries a ChatML template and
    <|im_end|> as end of turn, and `selfhost chat` (no --raw) replies what the data taught."""
    from selfhost.models.store import Store
    from selfhost.runtime import gguf_info

    text = tmp_path / "text.txt"
    text.write_text(TEXT, "utf-8")
    small = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64", "--batch-size", "8",
             "--eval-iters", "2", "--sample-tokens", "0"]  # fmt: skip
    base = runner.invoke(app, ["train", "gpt", "-d", str(text), "--name", "base", "--iters", "10", *small,
                               "--arch", "llama", "--no-export"])  # fmt: skip
    assert base.exit_code == 0, base.output
    chat = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": "to be"}]},
        {"messages": [{"role": "user", "content": "Quote"}, {"role": "assistant", "content": "nobler"}]},
    ]
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows * 8), "utf-8")
    tuned = runner.invoke(app, ["train", "gpt", "--init", "base", "--chat", str(chat), "--name", "base-chat",
                                "--iters", "60", "--lr", "3e-3", "--lora-rank", "0", "--batch-size", "8",
                                "--export-type", "f32"])  # fmt: skip
    assert tuned.exit_code == 0, tuned.output
    info = gguf_info.inspect(Store().find("base-chat").path)
    assert info.architecture == "llama" and "<|im_start|>" in (info.chat_template or "")
    assert ask(runner, "base-chat", "Say it").strip() == "to be"
    assert ask(runner, "base-chat", "Quote").strip() == "nobler"
