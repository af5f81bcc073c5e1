"""GPT training data and generation: KV-cache sampling, unseen characters, the memory-mapped token
files, CPU thread choice."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from selfhost.cli.app import app  # noqa: E402
from selfhost.events import Notice, Result  # noqa: E402
from selfhost.train import common, runs  # noqa: E402
from selfhost.train.gpt import checkpoint, data, tokenizer, trainer  # noqa: E402
from selfhost.train.gpt.config import build_config  # noqa: E402
from selfhost.train.gpt.model import GPT, GPTConfig  # noqa: E402


def tokens_of(model: GPT, idx: torch.Tensor, n: int, **kw) -> list[int]:  # noqa: ANN003
    return [int(t) for t in model.generate(idx, n, **kw)]


def random_gpt(seed: int, **kw) -> GPT:  # noqa: ANN003
    """Weights far from GPT-2's init (strong positions), so greedy decoding does not repeat one token."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 2.0 if name == "wpe.weight" else 0.3)
    return model


def count_positions(model: GPT) -> list[int]:
    """Token positions each forward pass computes (a hook on the token embedding)."""
    seen: list[int] = []
    model.wte.register_forward_hook(lambda mod, args, out: seen.append(args[0].numel()))
    return seen


# -- KV cache -----------------------------------------------------------------------------------
def test_kv_cache_gives_the_uncached_tokens_in_linear_work() -> None:
    model = random_gpt(0, vocab_size=65, block_size=300, n_layer=2, n_head=4, n_embd=64)
    prompt = torch.tensor([[64, 7, 8, 9]])
    work = count_positions(model)
    t0 = time.perf_counter()
    cached = tokens_of(model, prompt, 256, temperature=0)
    t_cached, cached_work = time.perf_counter() - t0, sum(work)
    work.clear()
    t0 = time.perf_counter()
    plain = tokens_of(model, prompt, 256, temperature=0, use_cache=False)
    t_plain, plain_work = time.perf_counter() - t0, sum(work)
    assert cached == plain and len(set(cached)) > 5  # greedy: the same 256 tokens
    assert cached_work == 4 + 255  # the prompt once, then one position per new token
    assert plain_work == sum(range(4, 4 + 256))  # every step re-reads the whole sequence
    print(f"256 tokens: cached {t_cached:.2f} s, uncached {t_plain:.2f} s ({t_plain / t_cached:.1f}x)")
    assert t_cached < t_plain / 2  # ~60x less work: a wide margin for a loaded machine


def test_kv_cache_past_the_context_and_when_sampling() -> None:
    model = random_gpt(1, vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    prompt = torch.tensor([[3, 4, 5]])
    # past 16 tokens positions shift: both paths re-read the last 16 tokens each step
    greedy = tokens_of(model, prompt, 40, temperature=0)
    assert greedy == tokens_of(model, prompt, 40, temperature=0, use_cache=False) and len(set(greedy)) > 3
    sampled = [
        tokens_of(model, prompt, 40, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(5),
                  use_cache=c)
        for c in (True, False)
    ]  # fmt: skip
    assert sampled[0] == sampled[1]
    long_prompt = torch.randint(0, 50, (2, 20))  # longer than the context, a batch of two
    steps = [list(model.generate(long_prompt, 5, temperature=0, use_cache=c)) for c in (True, False)]
    assert len(steps[0]) == 5 and all(torch.equal(a, b) for a, b in zip(*steps, strict=True))


def test_cached_forward_matches_full_forward() -> None:
    from selfhost.train.gpt.model import KVCache

    model = random_gpt(2, vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32)
    idx = torch.randint(0, 40, (2, 20))
    full, _ = model(idx)
    cache = KVCache.empty(model, 2, idx.device)
    parts = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 7), (7, 8), (8, 20))]  # multi-token appends
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


# -- unseen characters --------------------------------------------------------------------------
def test_unseen_characters_are_counted_with_examples(tmp_path: Path) -> None:
    tok = tokenizer.CharTokenizer.train(["hello world"])
    unseen = tok.unseen("héllo wörld, héé!")
    assert unseen.total == 6 and unseen.counts["é"] == 3 and unseen.counts["ö"] == 1
    line = unseen.describe("the prompt")
    assert line.startswith("6 characters of the prompt (4 distinct: 'é' x3") and "dropped" in line
    assert tok.unseen("hello").total == 0
    bpe = tokenizer.BPETokenizer.train(["hello world"] * 3, 300)
    assert bpe.unseen("héllo €").total == 0  # byte-level: every character has tokens

    # a resumed run whose arrays are rebuilt from new text with the saved tokenizer says what it drops
    new_text = tmp_path / "new.txt"
    new_text.write_text("hello wörld\n" * 50, "utf-8")
    ds = data.build_dataset(new_text, tok, 0.1, tmp_path / "run")
    assert ds.unseen is not None and ds.unseen.counts == {"ö": 50, "\n": 50}


@pytest.mark.slow
def test_sample_cli_reports_unseen_prompt_characters(runner, tmp_path: Path) -> None:  # noqa: ANN001
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40, "utf-8")
    flags = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
             "--eval-iters", "1", "--sample-tokens", "0", "--iters", "2", "--no-export"]  # fmt: skip
    result = runner.invoke(app, ["train", "gpt", "-d", str(text), "--name", "tiny", *flags])
    assert result.exit_code == 0, result.output
    out = runner.invoke(app, ["train", "sample", "tiny", "-p", "Zebra ßß", "-m", "5", "--seed", "1"])
    assert out.exit_code == 0, out.output
    first, second = out.output.splitlines()[:2]
    assert first.startswith("note: 3 characters of the prompt (2 distinct: 'ß' x2, 'Z' x1)")
    assert second.startswith("Zebra ßß")


# -- memory-mapped token files ------------------------------------------------------------------
def same_batches(a: data.Dataset, b: data.Dataset, seed: int) -> None:
    for arr_a, arr_b in ((a.train, b.train), (a.val, b.val)):
        sa, sb = (data.BatchSampler(arr, 8, 4, seed) for arr in (arr_a, arr_b))
        for _ in range(20):
            xa, ya = sa.next()
            xb, yb = sb.next()
            assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_memory_mapped_dataset_gives_the_in_memory_batches(tmp_path: Path, kind: str) -> None:
    docs_dir = tmp_path / "docs"
    (docs_dir / "sub").mkdir(parents=True)
    lines = [f"Line {i}: the quick brown fox, número {i * 7}!  \n" for i in range(400)]
    (docs_dir / "a.txt").write_text("".join(lines), "utf-8")
    (docs_dir / "blank.txt").write_text(" \n\n ", "utf-8")  # skipped, as in memory
    (docs_dir / "sub" / "b.md").write_text("Second doc.\nWith \ttabs\n\nand  gaps\n" * 50, "utf-8")
    docs = data.read_documents(docs_dir)
    tok = tokenizer.train_tokenizer(kind, docs, 400)
    # the tokenizer trained on streamed chunks is the same as on whole documents
    assert tokenizer.train_tokenizer(kind, data.stream_text(docs_dir, 300), 400).to_json() == tok.to_json()
    in_memory = data.split(data.encode_documents(tok, docs), 0.1, len(docs))
    mapped = data.build_dataset(docs_dir, tok, 0.1, tmp_path / "run", chunk_chars=300)  # many chunks
    assert isinstance(mapped.train, np.memmap) and mapped.n_documents == 2
    assert np.array_equal(mapped.train, in_memory.train) and np.array_equal(mapped.val, in_memory.val)
    same_batches(mapped, in_memory, seed=1337)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["train.npy", "val.npy"]  # no temp files


def test_tokenizing_streams_in_bounded_memory(tmp_path: Path) -> None:
    corpus = tmp_path / "big.txt"
    line = "All the world's a stage, and all the men and women merely players.\n"
    corpus.write_text(line * 120_000, "utf-8")  # 8 MB of text
    tok = tokenizer.CharTokenizer.train([line])
    tracemalloc.start()
    ds = data.build_dataset(corpus, tok, 0.05, tmp_path / "run", chunk_chars=1 << 16)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(ds.train) + len(ds.val) == len(line) * 120_000 + 1
    assert peak < corpus.stat().st_size / 4, peak  # about one chunk (here ~1 MB), not the 8 MB corpus
    chunks = list(data.iter_chunks(corpus, 1 << 16))
    assert len(chunks) > 100 and "".join(chunks) == corpus.read_text("utf-8")


def test_training_reads_the_token_files_it_wrote(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40, "utf-8")
    cfg = build_config("cpu-tiny", overrides=dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4,
                                                  eval_iters=1, sample_tokens=4, max_iters=2, eval_interval=2,
                                                  threads=1))  # fmt: skip
    events = list(trainer.train(trainer.TrainRequest(config=cfg, run_dir=tmp_path / "run", data=text,
                                                     handle_sigint=False)))  # fmt: skip
    start, done = events[0], events[-1]
    assert isinstance(start, Notice) and start.message.endswith(", 1 CPU thread")
    assert not [e for e in events if isinstance(e, Notice) and e.level == "warning"]  # nothing unseen
    assert isinstance(done, Result) and checkpoint.load(done.value.checkpoint)["iter_num"] == 2
    saved = data.Dataset.load(tmp_path / "run")
    assert saved is not None
    info = runs.read_info(tmp_path / "run")  # what the run recorded about itself
    assert info["threads"] == 1 and info["tokens"] == len(saved.train) + len(saved.val)
    assert f"data {info['tokens']:,} tokens" in start.message
    # a run that fails on its data leaves no folder behind
    short = tmp_path / "short.txt"
    short.write_text("too short", "utf-8")
    with pytest.raises(Exception, match="too short"):
        list(trainer.train(trainer.TrainRequest(config=cfg, run_dir=tmp_path / "bad", data=short)))
    assert not (tmp_path / "bad").exists()


# -- CPU threads --------------------------------------------------------------------------------
def test_auto_threads_leave_busy_cores_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(common, "cpu_cores", lambda: 4)
    monkeypatch.setattr(common, "busy_cores", lambda: 0.2)
    assert common.resolve_threads(0, cpu) == 4  # idle: every core
    monkeypatch.setattr(common, "busy_cores", lambda: 2.6)
    assert common.resolve_threads(0, cpu) == 1  # 4 - 2.6 -> 1
    assert common.resolve_threads(0, cpu, free_cores_only=False) == 4  # MNIST: every core it may use
    monkeypatch.setattr(common, "busy_cores", lambda: 9.0)
    assert common.resolve_threads(0, cpu) == 1 and torch.get_num_threads() == 1  # never zero
    monkeypatch.setattr(common, "busy_cores", lambda: 0.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert common.resolve_threads(0, cpu) == 2  # two processes share the cores
    assert common.resolve_threads(3, cpu) == 3  # asked for: as asked
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert common.resolve_threads(0, cpu) is None  # torchrun's (or the user's) choice stands
    assert common.resolve_threads(0, torch.device("meta")) is None
    assert 0 <= common.busy_cores() < 1000
