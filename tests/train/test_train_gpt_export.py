"""GGUF export of a trained GPT: llama.cpp must tokenize like us and compute the same logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from selfhost.runtime import gguf_info, llama_backend  # noqa: E402
from selfhost.train.gpt import checkpoint  # noqa: E402
from selfhost.train.gpt.export import BASE_CHAT_TEMPLATE, write_gguf  # noqa: E402
from selfhost.train.gpt.model import GPT, GPTConfig  # noqa: E402
from selfhost.train.gpt.tokenizer import EOT, BPETokenizer, CharTokenizer, Tokenizer  # noqa: E402

TRAIN_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    "ROMEO:\nWhat's this? 'Tis 1599, and 42 crowns!  Two spaces;\ttab\r\n"
    "Café, naïve, façade — déjà vu. 日本語のテキスト 😀 ✓ Ω ß\n"
) * 20
PROBES = [
    "Hello world, how are you?\nI'm fine!!  ok",
    "ROMEO:\nWhat's this?  \n\n  trailing   ",
    "Café naïve — 日本語 😀 tab\there\r\n",
    "unseen: € Ж ✗ ~~ {} <|endoftext|>",
    "   leading spaces and 12345 numbers, 3.14",
]


def random_model(tok: Tokenizer, seed: int = 0) -> GPT:
    """A small GPT with weights spread enough that its logits have clear argmaxes."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def export(tmp_path: Path, tok: Tokenizer, model: GPT, dtype: str = "f32") -> Path:
    dest = tmp_path / f"{tok.kind}.{dtype}.gguf"
    return write_gguf(dest, model.state_dict(), model.config.to_dict(), tok, name="t", dtype=dtype)  # type: ignore[arg-type]


def load(path: Path, **kw):  # noqa: ANN201
    llm, _ = llama_backend.load_model(path, n_ctx=64, n_threads=2, **kw)
    return llm


@pytest.fixture(scope="module", params=["char", "char-ascii", "bpe"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    if request.param == "char":
        return CharTokenizer.train([TRAIN_TEXT])
    if request.param == "char-ascii":  # no multi-byte characters: no merges at all (like tiny Shakespeare)
        return CharTokenizer.train([TRAIN_TEXT.encode("ascii", "ignore").decode()])
    return BPETokenizer.train([TRAIN_TEXT], vocab_size=400)


@pytest.mark.needs_model
def test_llama_cpp_tokenizes_like_us(tmp_path: Path, tok: Tokenizer) -> None:
    path = export(tmp_path, tok, random_model(tok))
    llm = load(path, vocab_only=True)
    for text in PROBES + [TRAIN_TEXT[:500]]:
        ours = tok.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert theirs == ours, text
    # the char vocabulary drops unseen characters (here € Ж ✗ { }) in both
    if tok.kind == "char":
        assert tok.decode(tok.encode("a€b{c}")) == "abc"
    # and the text round-trips through llama.cpp's detokenizer
    ids = tok.encode(PROBES[2])
    assert llm.detokenize(ids).decode("utf-8") == tok.decode(ids)
    if tok.kind == "bpe" or "é" in tok.decode(tok.encode("é")):
        assert tok.decode(ids) == PROBES[2]


@pytest.mark.needs_model
def test_llama_cpp_logits_match_pytorch(tmp_path: Path, tok: Tokenizer) -> None:
    model = random_model(tok)
    path = export(tmp_path, tok, model)
    ids = [tok.eot_id, *tok.encode("ROMEO:\nWhat's this? Café 日本語 😀, speak.")][:48]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0][0].numpy()  # (T, V)
    llm = load(path, logits_all=True)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-2
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    assert expected.std() > 0.1  # not a degenerate, near-uniform model


def test_gguf_metadata_and_f16(tmp_path: Path) -> None:
    tok = CharTokenizer.train([TRAIN_TEXT])
    model = random_model(tok)
    info = gguf_info.inspect(export(tmp_path, tok, model, "f16"))
    assert info.architecture == "gpt2"
    assert info.tokenizer_model == "gpt2"
    assert info.quant == "F16"
    assert info.chat_template == BASE_CHAT_TEMPLATE
    assert info.bos_token_id == info.eos_token_id == tok.eot_id
    assert info.context_length == 64
    assert info.n_params == sum(p.numel() for p in model.parameters())  # tied output stored once
    assert "F16" in info.tensor_types and "F32" in info.tensor_types  # matrices F16, norms/biases F32


@pytest.mark.needs_model
def test_cli_export_registers_and_quantizes(tmp_path: Path, runner) -> None:  # noqa: ANN001
    from selfhost.cli.app import app
    from selfhost.models.store import Store

    tok = BPETokenizer.train([TRAIN_TEXT], vocab_size=400)
    model = random_model(tok)
    run = tmp_path / "my-run"
    checkpoint.save(run / checkpoint.CKPT_NAME, {
        "model_args": model.config.to_dict(), "config": {}, "tokenizer": tok.to_json(),
        "model": model.state_dict(),
    })  # fmt: skip
    result = runner.invoke(app, ["train", "export", str(run), "--name", "my-gpt", "--type", "f32"])
    assert result.exit_code == 0, result.output
    record = Store().find("my-gpt")
    assert record.source == "trained" and record.quant == "F32" and record.path.is_file()
    assert gguf_info.inspect(record.path).architecture == "gpt2"

    # llama.cpp completes a raw prompt with it exactly as PyTorch's greedy decoding does
    llm = load(record.path)
    out = llm.create_completion("ROMEO:", max_tokens=8, temperature=0.0)
    prompt = [tok.eot_id, *tok.encode("ROMEO:")]
    assert out["choices"][0]["text"] == tok.decode(greedy_continuation(model, prompt, 8, tok.eot_id))

    # Q8_0 works on the exported rows (n_embd 64 is a multiple of 32)
    lib = llama_backend.llama()
    params = lib.llama_model_quantize_default_params()
    params.ftype = lib.LLAMA_FTYPE_MOSTLY_Q8_0
    q8 = tmp_path / "my-gpt.Q8_0.gguf"
    import ctypes

    with llama_backend.capture_logs():
        rc = lib.llama_model_quantize(str(record.path).encode(), str(q8).encode(), ctypes.byref(params))
    assert rc == 0
    assert gguf_info.inspect(q8).quant == "Q8_0"
    llm8 = load(q8, logits_all=True)
    ids = [tok.eot_id, *tok.encode("Speak, speak.")]
    llm8.eval(ids)
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(np.array(llm8.scores[: len(ids)]) - expected).max() < 0.15  # measured 0.06 (Q4_0: 0.56)


def test_eot_is_a_control_token() -> None:
    for tok in (CharTokenizer.train([TRAIN_TEXT]), BPETokenizer.train([TRAIN_TEXT], vocab_size=300)):
        vocab = tok.gguf_vocab()
        assert vocab.tokens[tok.eot_id] == EOT and vocab.types[tok.eot_id] == 3
        assert vocab.types.count(3) == 1
        assert tok.encode(EOT) != [tok.eot_id]  # in text it is just text, as in llama.cpp


@pytest.mark.needs_model
@pytest.mark.slow
def test_briefly_trained_bpe_model_on_documents_keeps_parity(tmp_path: Path, runner) -> None:  # noqa: ANN001
    from selfhost import paths
    from selfhost.cli.app import app
    from selfhost.models.store import Store
    from selfhost.train.gpt import tokenizer
    from selfhost.train.gpt.checkpoint import model_from_checkpoint

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, chunk in enumerate(TRAIN_TEXT.split("ROMEO:")):
        (docs / f"{i:03d}.txt").write_text(f"ROMEO:{chunk}" * 3, "utf-8")
    args = ["train", "gpt", "-d", str(docs), "--name", "bpe-gpt", "--tokenizer", "bpe", "--vocab-size", "300",
            "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "32", "--batch-size", "4",
            "--iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--export-type=f32"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "bpe vocabulary" in result.output
    record = Store().find("bpe-gpt")
    ckpt = checkpoint.load(paths.runs_dir() / "bpe-gpt")  # its best weights: what was exported
    tok = tokenizer.from_json(ckpt["tokenizer"])
    model = model_from_checkpoint(ckpt, torch.device("cpu"))
    llm = load(record.path, logits_all=True)
    text = "ROMEO:\nWhat's this? Café 日本語 😀"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    ids = [tok.eot_id, *tok.encode(text)][:32]
    llm.eval(ids)
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0][0].numpy()
    got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - expected).max() <= 1e-2
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def greedy_continuation(model: torch.nn.Module, ids: list[int], n: int, eot: int) -> list[int]:
    """PyTorch greedy decoding: the tokens llama.cpp must produce at temperature 0."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([out]))[0][0, -1].argmax())
            if token == eot:
                break
            out.append(token)
    return out[len(ids) :]


@pytest.mark.needs_model
def test_readme_quantize_then_chat_commands(tmp_path: Path, runner) -> None:  # noqa: ANN001
    """`selfhost chat my-gpt --raw -p "ROMEO:"` and `selfhost quantize my-gpt --type Q8_0 &&
    selfhost chat my-gpt:Q8_0 --raw -p "ROMEO:"`, as the README writes them, checked against PyTorch."""
    import json

    from selfhost.cli.app import app
    from selfhost.models.store import Store

    tok = BPETokenizer.train([TRAIN_TEXT], vocab_size=400)
    model = random_model(tok, seed=3)
    run = tmp_path / "my-run"
    checkpoint.save(run / checkpoint.CKPT_NAME, {
        "model_args": model.config.to_dict(), "config": {}, "tokenizer": tok.to_json(),
        "model": model.state_dict(),
    })  # fmt: skip
    exported = runner.invoke(app, ["train", "export", str(run), "--name", "my-gpt", "--type", "f32"])
    assert exported.exit_code == 0, exported.output
    chat = ["--raw", "-p", "ROMEO:", "-t", "0", "-n", "12", "--json", "--no-log", "--threads", "1"]

    f32 = runner.invoke(app, ["chat", "my-gpt", *chat])
    assert f32.exit_code == 0, f32.output
    reply = json.loads(f32.output.partition("\n")[2])
    prompt = [tok.eot_id, *tok.encode("ROMEO:")]  # raw mode adds the model's BOS (<|endoftext|>)
    assert reply["usage"]["prompt_tokens"] == len(prompt)
    expected = greedy_continuation(model, prompt, 12, tok.eot_id)
    assert len(expected) >= 4 and reply["reply"] == tok.decode(expected)

    quantized = runner.invoke(app, ["quantize", "my-gpt", "--type", "Q8_0", "--threads", "1"])
    assert quantized.exit_code == 0, quantized.output
    assert "registered as my-gpt:Q8_0" in quantized.output
    q8 = runner.invoke(app, ["chat", "my-gpt:Q8_0", *chat])
    assert q8.exit_code == 0, q8.output
    assert "Q8_0" in q8.output.partition("\n")[0]
    q8_reply = json.loads(q8.output.partition("\n")[2])
    assert q8_reply["usage"]["prompt_tokens"] == len(prompt) and q8_reply["usage"]["generated_tokens"] > 0

    # Q8_0 logits stay close to PyTorch's (measured max error 0.06; Q4_0 reaches 0.56)
    record = Store().find("my-gpt:Q8_0")
    llm = load(record.path, logits_all=True)
    ids = [tok.eot_id, *tok.encode("Speak, speak. ROMEO: What's this?")]
    llm.eval(ids)
    with torch.no_grad():
        reference = model(torch.tensor([ids]))[0][0].numpy()
    error = np.abs(np.array(llm.scores[: len(ids)]) - reference).max()
    assert 0 < error < 0.15, error


LLAMA_VARIANTS = {  # name -> (model args, the GGUF architecture)
    "llama": ({}, "llama"),
    "llama-gqa-untied": ({"n_kv_head": 1, "tie_embeddings": False}, "llama"),
    "qk-norm": ({"qk_norm": True, "n_kv_head": 1}, "qwen3"),
}


def random_llama(tok: Tokenizer, seed: int = 0, **kw) -> torch.nn.Module:  # noqa: ANN003
    from selfhost.train.gpt.model import build_model

    torch.manual_seed(seed)
    model = build_model(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64,
                                  arch="llama", **kw))  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.needs_model
@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_llama_style_model_matches_llama_cpp(tmp_path: Path, variant: str) -> None:
    """Rotary (query/key rows permuted for llama, as is for qwen3), RMSNorm, SwiGLU, GQA, QK-norm, untied
    head: llama.cpp computes our logits (same bound as the gpt2 parity test)."""
    kw, arch = LLAMA_VARIANTS[variant]
    tok = BPETokenizer.train([TRAIN_TEXT], vocab_size=400)
    model = random_llama(tok, **kw)
    path = export(tmp_path, tok, model)
    assert gguf_info.inspect(path).architecture == arch
    ids = [tok.eot_id, *tok.encode("ROMEO:\nWhat's this? Café 日本語 😀, speak.")][:48]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0][0].numpy()
    llm = load(path, logits_all=True)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - expected).max() <= 1e-2
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    assert expected.std() > 0.1


@pytest.mark.needs_model
def test_llama_style_export_quantizes_and_chats(tmp_path: Path, runner) -> None:  # noqa: ANN001
    """`selfhost train export` of a llama-style run, `selfhost quantize --type Q8_0`, then chat with it."""
    import json

    from selfhost.cli.app import app

    tok = BPETokenizer.train([TRAIN_TEXT], vocab_size=400)
    model = random_llama(tok, seed=3, n_kv_head=1)
    run = tmp_path / "my-llama"
    checkpoint.save(run / checkpoint.CKPT_NAME, {
        "model_args": model.config.to_dict(), "config": {}, "tokenizer": tok.to_json(),
        "model": model.state_dict(),
    })  # fmt: skip
    exported = runner.invoke(app, ["train", "export", str(run), "--name", "my-llama", "--type", "f32"])
    assert exported.exit_code == 0, exported.output
    chat = ["--raw", "-p", "ROMEO:", "-t", "0", "-n", "12", "--json", "--no-log", "--threads", "1"]
    f32 = json.loads(runner.invoke(app, ["chat", "my-llama", *chat]).output.partition("\n")[2])
    prompt = [tok.eot_id, *tok.encode("ROMEO:")]
    expected = greedy_continuation(model, prompt, 12, tok.eot_id)
    assert len(expected) >= 4 and f32["reply"] == tok.decode(expected)
    quantized = runner.invoke(app, ["quantize", "my-llama", "--type", "Q8_0", "--threads", "1"])
    assert quantized.exit_code == 0, quantized.output
    q8 = runner.invoke(app, ["chat", "my-llama:Q8_0", *chat])
    assert q8.exit_code == 0 and "Q8_0" in q8.output.partition("\n")[0], q8.output
    assert json.loads(q8.output.partition("\n")[2])["usage"]["generated_tokens"] > 0
