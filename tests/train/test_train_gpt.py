"""`selfhost train gpt`: config, data, training on real text, exact resume, DDP, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from selfhost.cli.app import app  # noqa: E402
from selfhost.errors import NotFoundError, UsageError  # noqa: E402
from selfhost.events import Notice, Progress, Result  # noqa: E402
from selfhost.train.gpt import checkpoint, data, estimate, options, trainer  # noqa: E402
from selfhost.train.gpt.config import build_config  # noqa: E402
from selfhost.train.gpt.optim import lr_factor  # noqa: E402
from selfhost.train.gpt.setup import gpt_config  # noqa: E402
from selfhost.train.gpt.tokenizer import CharTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_iters=2, sample_tokens=8,
            warmup_iters=2, log_interval=1)  # fmt: skip
TINY_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
              "--eval-iters", "2", "--sample-tokens", "8", "--warmup", "2"]  # fmt: skip


def one_line_error(result, needle: str) -> None:  # noqa: ANN001
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


# -- config -------------------------------------------------------------------------------------
def test_presets_and_precedence(tmp_path: Path) -> None:
    seed = build_config("seed")
    assert (seed.batch_size, seed.block_size, seed.max_iters, seed.eval_interval, seed.eval_iters) == (
        64, 256, 5000, 500, 200)  # fmt: skip
    assert (seed.learning_rate, seed.n_embd, seed.n_head, seed.n_layer, seed.dropout) == (
        3e-4,
        384,
        6,
        6,
        0.2,
    )
    sc = build_config("shakespeare-char")
    assert (sc.learning_rate, sc.min_lr, sc.warmup_iters, sc.beta2, sc.n_embd) == (1e-3, 1e-4, 100, 0.99, 384)
    for name in options.preset_names():  # Q8_0 needs rows that are multiples of 32
        assert build_config(name).n_embd % 32 == 0
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "shakespeare-char"\nn-layer = 3\nlearning_rate = 5e-4\n', "utf-8")
    cfg = build_config(config_file=toml, overrides={"learning_rate": 2e-3, "dropout": None})
    assert (cfg.n_layer, cfg.learning_rate, cfg.dropout, cfg.n_embd) == (3, 2e-3, 0.2, 384)
    with pytest.raises(NotFoundError, match="unknown preset 'huge'"):
        build_config("huge")
    with pytest.raises(UsageError, match="multiple of n_head"):
        build_config(overrides={"n_embd": 100, "n_head": 3})
    toml.write_text("n_layers = 3\n", "utf-8")
    with pytest.raises(UsageError, match="n_layers"):
        build_config(config_file=toml)


def test_learning_rate_schedule() -> None:
    cfg = build_config("shakespeare-char")
    f = lr_factor(cfg)
    assert f(0) == pytest.approx(1 / 101)
    assert f(100) == pytest.approx(1.0)
    assert f(5000) == pytest.approx(0.1) and f(9000) == pytest.approx(0.1)
    assert 0.1 < f(2500) < 1.0
    assert lr_factor(build_config("seed"))(4000) == 1.0  # the seed's constant rate


# -- data + estimate ----------------------------------------------------------------------------
def test_folder_of_documents_gets_end_of_text(tmp_path: Path) -> None:
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("abc", "utf-8")
    (tmp_path / "docs" / "sub" / "b.md").write_text("de", "utf-8")
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\x00\xff")
    docs = data.read_documents(tmp_path / "docs")
    assert docs == ["abc", "de"]
    tok = CharTokenizer.train(docs)
    tokens = data.encode_documents(tok, docs)
    assert tokens.dtype.name == "uint16"
    assert tokens.tolist() == [0, 1, 2, tok.eot_id, 3, 4, tok.eot_id]


def test_estimate_counts_match_the_model() -> None:
    from selfhost.train.gpt.model import GPT

    cfg = build_config("seed")
    model = GPT(gpt_config(cfg, 65))
    n, total = estimate.count_params(cfg, 65)
    assert (n, total) == (model.num_params(), model.num_params(non_embedding=False))
    est = estimate.make_estimate(cfg, 65, 1_000_000, device="cpu", tokens_per_s=1000.0)
    assert est.flops_per_token == 6 * n + 12 * 6 * 384 * 256
    assert est.tokens_per_iter == 64 * 256 and est.total_tokens == 64 * 256 * 5000
    assert est.compute_optimal_tokens == 20 * n
    assert est.eta_s is not None and est.eta_s > est.total_tokens / 1000.0
    assert estimate.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and estimate.peak_flops("CPU") is None


@pytest.mark.slow
def test_cli_estimate_measures_and_writes_nothing(runner, text_file: Path, isolated_home: Path) -> None:  # noqa: ANN001
    result = runner.invoke(app, ["train", "gpt", "-d", str(text_file), "--estimate", *TINY_FLAGS])
    assert result.exit_code == 0, result.output
    assert "tokens/s measured" in result.output and "ETA" in result.output
    assert "compute-optimal" in result.output and "FLOPs/token" in result.output
    assert not (isolated_home / "runs" / "text-gpt").exists()


# -- training -----------------------------------------------------------------------------------
def is_step(ev: object) -> bool:
    """A logged training step (the first "train" Progress, the estimate, has no loss)."""
    return isinstance(ev, Progress) and ev.task == "train" and "loss" in ev.metrics


def is_eval(ev: object) -> bool:
    return isinstance(ev, Progress) and ev.task == "eval"


def run_events(req: trainer.TrainRequest, stop_at: int | None = None) -> list:
    events: list = []
    try:
        for ev in trainer.train(req):
            events.append(ev)
            if stop_at is not None and is_step(ev) and ev.done == stop_at:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C
    except KeyboardInterrupt:
        events.append("KeyboardInterrupt")  # type: ignore[arg-type]
    return events


@pytest.mark.slow
def test_training_on_shakespeare_lowers_val_loss(shared_data: Path, tmp_path: Path) -> None:
    small = {"n_embd": 64, "block_size": 32, "batch_size": 8, "max_iters": 60, "eval_interval": 30}
    cfg = build_config("cpu-tiny", overrides={**TINY, **small, "eval_iters": 4, "learning_rate": 3e-3})
    req = trainer.TrainRequest(
        config=cfg, run_dir=tmp_path / "run", data=shared_data / "tinyshakespeare/input.txt"
    )
    events = run_events(req)
    evals = [e for e in events if is_eval(e)]
    assert [e.done for e in evals] == [0, 30, 60]
    assert evals[-1].metrics["val_loss"] < evals[0].metrics["val_loss"] - 0.5
    assert isinstance(events[-1], Result) and isinstance(events[-1].value, trainer.TrainResult)
    for e in evals:  # a text sample right after each eval
        sample = events[events.index(e) + 1]
        assert isinstance(sample, Notice) and sample.message.removesuffix("\n---").strip()
    done = events[-1].value
    ckpt = checkpoint.load(done.checkpoint)
    assert ckpt["iter_num"] == 60 and "optimizer" in ckpt
    assert done.best == tmp_path / "run" / "best.pt"
    assert done.best_val_loss == min(e.metrics["val_loss"] for e in evals)
    best = checkpoint.load(tmp_path / "run")  # a run folder means its best weights
    assert best["val_loss"] == done.best_val_loss and "optimizer" not in best
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.pt",
        "ckpt.pt",
        "config.json",
        "metrics.jsonl",
        "run.json",
        "tokenizer.json",
        "train.npy",
        "val.npy",
    ]  # fmt: skip  (the run records itself: metrics.jsonl, run.json)


def losses(events: list) -> dict[str, float]:  # noqa: ANN001
    out = {}
    for e in events:
        if is_step(e):
            out[f"step {e.done}"] = e.metrics["loss"]
        elif is_eval(e):
            out[f"eval {e.done}"] = e.metrics["val_loss"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [5, 8])  # between evals, and right after the eval-step 8
def test_interrupted_run_resumes_exactly(text_file: Path, tmp_path: Path, stop_at: int) -> None:
    cfg = build_config("cpu-tiny", overrides={**TINY, "max_iters": 12, "eval_interval": 4, "dropout": 0.1})
    full = run_events(trainer.TrainRequest(config=cfg, run_dir=tmp_path / "a", data=text_file))
    assert isinstance(full[-1], Result)

    part = run_events(trainer.TrainRequest(config=cfg, run_dir=tmp_path / "b", data=text_file), stop_at)
    assert part[-1] == "KeyboardInterrupt"
    assert isinstance(part[-2], Notice) and part[-2].message.startswith(f"stopped at step {stop_at};")
    assert str(tmp_path / "b" / "ckpt.pt") in part[-2].message
    assert checkpoint.load(tmp_path / "b" / "ckpt.pt")["iter_num"] == stop_at
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    rest = run_events(trainer.TrainRequest(config=cfg, run_dir=tmp_path / "b", resume=True))
    assert isinstance(rest[0], Notice) and rest[0].message.startswith(f"resuming at step {stop_at} in ")
    start = next(e for e in rest if isinstance(e, Progress))
    assert start.task == "train" and start.done == stop_at and "n_params" in start.metrics  # the estimate
    resumed = {**losses(part), **losses(rest)}
    expected = losses(full)
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        assert resumed[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.needs_model
@pytest.mark.slow
def test_cli_trains_exports_and_samples(runner, text_file: Path) -> None:  # noqa: ANN001
    from selfhost.models.store import Store

    args = ["train", "gpt", "-d", str(text_file), "--name", "bard", "--iters", "4", "--eval-interval", "2"]
    result = runner.invoke(app, [*args, *TINY_FLAGS])
    assert result.exit_code == 0, result.output
    assert "step 4: train loss" in result.output and "registered as 'bard'" in result.output
    record = Store().find("bard")
    assert record.source == "trained" and record.quant == "F16"
    # the exported char model (ASCII only: no merges) loads in llama.cpp and completes a raw prompt
    chat = runner.invoke(app, ["chat", "bard", "--raw", "-p", "To be", "--max-tokens", "5", "--seed", "1"])
    assert chat.exit_code == 0, chat.output
    result = runner.invoke(app, ["gpt", "sample", "bard", "-p", "To be", "-m", "20", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("To be")
    # seeded sampling is reproducible; `train sample` is the older spelling of `gpt sample`
    again = runner.invoke(app, ["train", "sample", "bard", "-p", "To be", "-m", "20", "--seed", "1"])
    assert again.output == result.output
    as_json = runner.invoke(app, ["gpt", "sample", "bard", "-p", "To be", "-m", "20", "--seed", "1",
                                  "--json"])  # fmt: skip
    assert json.loads(as_json.stdout) == {"prompt": "To be", "text": result.output.removeprefix("To be")[:-1]}
    # a second run into the same folder is refused instead of overwriting the first
    one_line_error(runner.invoke(app, [*args, *TINY_FLAGS]), "already holds a training run")
    # resuming with a longer context than the model has is refused in one line
    more = runner.invoke(app, [*args, "--resume", "--iters", "6", "--block-size", "64"])
    one_line_error(more, "block size 64 is larger than the model's context of 16")
    more = runner.invoke(app, [*args, "--resume", "--iters", "6", "--no-export"])
    assert more.exit_code == 0, more.output
    assert "resuming at step 4" in more.output and "step 6: train loss" in more.output


@pytest.mark.slow
def test_ddp_under_torchrun_writes_one_checkpoint(text_file: Path, isolated_home: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "selfhost", "train", "gpt", "-d", str(text_file), "--name", "ddp", "--iters", "4",
           "--eval-interval", "2", "--no-export", *TINY_FLAGS]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELFHOST_HOME": str(isolated_home)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 processes" in proc.stderr  # progress on stderr, the result on stdout
    assert proc.stdout.count("done: 4 steps") == 1  # only rank 0 reports
    run = isolated_home / "runs" / "ddp"
    # rank 0 alone writes: one checkpoint (+ the best weights), no per-rank copies, no temp files
    assert sorted(p.name for p in run.glob("*.pt*")) == ["best.pt", "ckpt.pt"]
    assert not list(run.glob(".*"))
    ckpt = checkpoint.load(run / "ckpt.pt")
    assert ckpt["iter_num"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng"]["ranks"]) == 2


# -- bad input: one clear line each -------------------------------------------------------------
def test_bad_inputs_are_one_line_errors(runner, tmp_path: Path, text_file: Path) -> None:  # noqa: ANN001
    gpt = ["train", "gpt", "--no-export", *TINY_FLAGS]
    one_line_error(runner.invoke(app, [*gpt, "-d", str(tmp_path / "nope.txt")]), "no such data file")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", "utf-8")
    one_line_error(runner.invoke(app, [*gpt, "-d", str(empty)]), "is empty")
    (tmp_path / "emptydir").mkdir()
    one_line_error(runner.invoke(app, [*gpt, "-d", str(tmp_path / "emptydir")]), "no text files")
    short = tmp_path / "short.txt"
    short.write_text("just a few words here", "utf-8")
    one_line_error(runner.invoke(app, [*gpt, "-d", str(short)]), "too short")
    one_line_error(runner.invoke(app, [*gpt, "-d", str(text_file), "--preset", "huge"]), "unknown preset")
    one_line_error(runner.invoke(app, [*gpt, "-d", str(text_file), "--n-head", "3"]), "multiple of n_head")
    one_line_error(runner.invoke(app, [*gpt, "--resume", "--name", "none"]), "no checkpoint")

    corrupt = tmp_path / "bad"
    corrupt.mkdir()
    (corrupt / "ckpt.pt").write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    one_line_error(runner.invoke(app, ["train", "export", str(corrupt)]), "is corrupt")
    one_line_error(runner.invoke(app, ["gpt", "export", str(corrupt)]), "is corrupt")
    one_line_error(runner.invoke(app, ["train", "sample", str(corrupt)]), "is corrupt")
    (corrupt / "ckpt.pt").write_bytes(b"")
    one_line_error(runner.invoke(app, ["train", "sample", str(corrupt / "ckpt.pt")]), "is corrupt")


def test_checkpoints_refuse_arbitrary_pickles(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, ("echo pwned",))

    path = tmp_path / "ckpt.pt"
    torch.save({"format": "selfhost-gpt", "x": Evil()}, path)
    with pytest.raises(Exception, match="corrupt or not a selfhost checkpoint"):
        checkpoint.load(path)


def test_missing_torch_is_a_dependency_error(
    monkeypatch: pytest.MonkeyPatch, runner, text_file: Path
) -> None:  # noqa: ANN001
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    result = runner.invoke(app, ["train", "gpt", "-d", str(text_file)])
    one_line_error(result, "PyTorch is not installed (install selfhost[train])")


def _torchrun(out: Path, home: Path, *args: str, **popen: object) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests/fakes/ddp_driver.py"), str(out), "train", "gpt", "--name", "ddp", "--no-export",
           "--eval-interval", "50", *TINY_FLAGS, *args]  # fmt: skip
    from tests.conftest import checkout_env

    env = checkout_env(OMP_NUM_THREADS="1", SELFHOST_HOME=str(home))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.slow
def test_ddp_ranks_differ_in_data_stay_in_sync_and_resume_exactly_after_ctrl_c(
    text_file: Path, tmp_path: Path
) -> None:
    """torchrun (gloo, 2 CPU ranks): each rank samples its own batches, the parameters stay identical,
    and Ctrl-C then --resume ends with the weights and data order of an uninterrupted run."""
    straight = _torchrun(tmp_path / "a", tmp_path / "home-a", "-d", str(text_file), "--iters", "120")
    log = straight.communicate(timeout=240)[0]
    assert straight.returncode == 0, log[-3000:]
    a = tmp_path / "a"
    batches = [(a / f"rank{r}.batches").read_text().splitlines() for r in (0, 1)]
    assert len(batches[0]) == len(batches[1]) >= 120
    assert all(x != y for x, y in zip(batches[0], batches[1], strict=True))  # different data per rank
    w0, w1 = (torch.load(a / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # parameters in sync after every step
    saved = checkpoint.load(tmp_path / "home-a" / "runs" / "ddp" / "ckpt.pt")["model"]
    assert all(torch.equal(saved[k], w0[k]) for k in w0)

    b = tmp_path / "b"
    cut = _torchrun(b, tmp_path / "home-b", "-d", str(text_file), "--iters", "120", start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and cut.poll() is None:
        done = (b / "rank0.batches").read_text().count("\n") if (b / "rank0.batches").exists() else 0
        if done >= 10:
            break
        time.sleep(0.02)
    os.killpg(cut.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: every process of the group
    log = cut.communicate(timeout=120)[0]
    ckpt = checkpoint.load(tmp_path / "home-b" / "runs" / "ddp" / "ckpt.pt")
    stopped_at = ckpt["iter_num"]
    assert 10 <= stopped_at < 120 and len(ckpt["rng"]["ranks"]) == 2, log[-3000:]
    resumed = _torchrun(b, tmp_path / "home-b", "--resume", "--iters", "120")
    log = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0 and f"resuming at step {stopped_at}" in log, log[-3000:]
    r0 = torch.load(b / "rank0.pt")
    for k in w0:
        torch.testing.assert_close(r0[k], w0[k], rtol=0, atol=1e-6, msg=k)


def test_llama_muon_run_resumes_exactly(text_file: Path, tmp_path: Path) -> None:
    """The llama-style model with Muon + AdamW and the wsd schedule: stop, --resume, same losses."""
    cfg = build_config("cpu-tiny", overrides={**TINY, "max_iters": 10, "eval_interval": 4, "arch": "llama",
                                              "n_kv_head": 1, "qk_norm": True, "optimizer": "muon",
                                              "lr_schedule": "wsd"})  # fmt: skip
    full = run_events(trainer.TrainRequest(config=cfg, run_dir=tmp_path / "a", data=text_file))
    part = run_events(trainer.TrainRequest(config=cfg, run_dir=tmp_path / "b", data=text_file), 6)
    assert part[-1] == "KeyboardInterrupt"
    saved = checkpoint.load(tmp_path / "b" / "ckpt.pt", resume=True)
    assert [type(p) for p in saved["optimizer"]["parts"]] == [dict, dict]  # AdamW and Muon
    assert any("momentum_buffer" in s for s in saved["optimizer"]["parts"][1]["state"].values())
    rest = run_events(trainer.TrainRequest(config=cfg, run_dir=tmp_path / "b", resume=True))
    resumed, expected = {**losses(part), **losses(rest)}, losses(full)
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        assert resumed[key] == pytest.approx(value, abs=1e-6), key
    assert expected["eval 10"] < expected["eval 0"]


def test_wsd_schedule_is_flat_then_linear() -> None:
    cfg = build_config("cpu-tiny", overrides={"lr_schedule": "wsd", "max_iters": 1000, "lr_decay_iters": 1000,
                                              "warmup_iters": 10, "cooldown": 0.2})  # fmt: skip
    f = lr_factor(cfg)
    assert f(0) == pytest.approx(1 / 11) and f(10) == f(799) == 1.0
    floor = cfg.min_lr / cfg.learning_rate
    assert f(900) == pytest.approx(floor + (1 - floor) * 0.5) and f(1000) == pytest.approx(floor)
