"""`selfhost quantize` on tiny generated GGUFs: real llama.cpp quantization, options, imatrix, bad input."""

from __future__ import annotations

import json
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from selfhost import paths
from selfhost.cli.app import app
from selfhost.events import Progress, Result, run_to_end
from selfhost.models.store import Store
from selfhost.quantize.flow import QuantizeOptions, quantize, run_quantize
from selfhost.runtime import gguf_info
from tests.conftest import one_error_line
from tests.fakes.tinygguf import write_tiny_llama

pytestmark = pytest.mark.needs_model  # every test runs llama.cpp on tiny GGUFs


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory: pytest.TempPathFactory, tiny_f32: Path) -> Path:
    out = tmp_path_factory.mktemp("q8") / "tiny-q8.gguf"
    run_quantize(str(tiny_f32), QuantizeOptions(type="Q8_0", out=out, threads=1, add_to_store=False))
    return out


def tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def listing(*dirs: Path) -> set[str]:
    return {str(p) for d in dirs if d.exists() for p in d.rglob("*")}


# -- listing types -------------------------------------------------------------------------
def test_list_types_shows_every_llama_cpp_type_with_published_cost(runner):
    import llama_cpp

    result = runner.invoke(app, ["quantize", "--list-types"])
    assert result.exit_code == 0, result.output
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            assert attr.removeprefix("LLAMA_FTYPE_MOSTLY_") in result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 3}
    assert "+0.1754" in rows["Q4_K_M"] and "4.90" in rows["Q4_K_M"] and "recommended" in rows["Q4_K_M"]
    assert "+0.0026" in rows["Q8_0"] and "+3.5199" in rows["Q2_K"] and "+0.4685" in rows["Q4_0"]
    for name in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"):
        assert "required" in rows[name]
    assert "required" not in rows["Q2_K"]


# -- real quantization ---------------------------------------------------------------------
def test_quantize_registers_output_and_reports_summary(runner, tiny_f32):
    result = runner.invoke(app, ["quantize", str(tiny_f32), "--type", "q4_k_m", "--threads", "1"])
    assert result.exit_code == 0, result.output
    out = paths.models_dir() / "tiny-Q4_K_M.gguf"
    assert out.is_file() and (out.stat().st_mode & 0o777) != 0o600
    info = gguf_info.inspect(out)
    assert info.quant == "Q4_K_M" and info.size < tiny_f32.stat().st_size / 5
    record = Store().get("tiny:Q4_K_M")
    assert record is not None and record.source == "quantized" and record.parent == "tiny"
    assert record.quant == "Q4_K_M" and Path(record.path) == out.resolve() and record.size == info.size
    assert "0 fell back" in result.output and "tiny:Q4_K_M" in result.output
    # the digest is left for later: `models show` computes it once and keeps it
    assert record.sha256 is None
    shown = runner.invoke(app, ["models", "show", "tiny:Q4_K_M", "--json"])
    assert shown.exit_code == 0, shown.output
    from selfhost.models.store import sha256_file

    assert json.loads(shown.output)["sha256"] == sha256_file(out) == Store().get("tiny:Q4_K_M").sha256
    assert "bits per weight 32.03 ->" in result.output

    from selfhost.models.resolve import resolve_model

    assert resolve_model("tiny:Q4_K_M").path == out.resolve()
    # llama.cpp's own log never reaches the terminal
    assert "llama_model_loader" not in result.output and "converting to" not in result.output


def test_progress_events_cover_every_tensor(tiny_f32, tmp_path):
    events = list(quantize(str(tiny_f32), QuantizeOptions(type="Q6_K", out=tmp_path / "o.gguf", threads=1)))
    progress = [e for e in events if isinstance(e, Progress)]
    total = gguf_info.inspect(tiny_f32).n_tensors
    assert [e.done for e in progress] == list(range(0, total + 1))  # 0: llama.cpp is about to start
    assert {e.task for e in progress} == {"Q6_K"} and {e.total for e in progress} == {total}
    converted = [e.detail.split(" -> ") for e in progress if " -> " in e.detail]
    assert {to_type for _name, to_type in converted} == {"Q6_K"} and len(converted) == 16
    assert isinstance(events[-1], Result) and events[-1].value.n_quantized == 16


def test_advanced_options_reach_llama_cpp(tiny_f32, tmp_path):
    def run(name: str, **kw) -> dict[str, str]:  # noqa: ANN003
        out = tmp_path / f"{name}.gguf"
        options = QuantizeOptions(type="Q4_K_M", out=out, threads=1, add_to_store=False, **kw)
        run_quantize(str(tiny_f32), options)
        return tensor_types(out)

    mixed = run("mixed")
    assert "Q6_K" in mixed.values()  # Q4_K_M keeps some tensors at Q6_K
    pure = run("pure", pure=True)
    assert {t for n, t in pure.items() if not n.endswith("norm.weight")} == {"Q4_K"}
    leave = run("leave", leave_output_tensor=True)
    assert leave["output.weight"] == "F32"
    typed = run("typed", output_tensor_type="q8_0", token_embedding_type="F16")
    assert typed["output.weight"] == "Q8_0" and typed["token_embd.weight"] == "F16"


def test_eval_prints_quality_table(runner, tiny_f32, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and then the other one sat there too. " * 40)
    result = runner.invoke(
        app,
        ["quantize", str(tiny_f32), "-t", "Q8_0", "--out", str(tmp_path / "e.gguf"), "--threads", "1",
         "--eval", str(text), "--window", "64", "--chunks", "2"],
    )
    assert result.exit_code == 0, result.output
    assert "reference" in result.output and "Q8_0" in result.output and "ppl" in result.output


# -- importance matrix ---------------------------------------------------------------------
def imatrix_entries(model: Path) -> dict[str, int]:
    """weight tensor -> its row length (the imatrix length llama.cpp expects)."""
    from gguf import GGUFReader

    return {t.name: int(t.shape[0]) for t in GGUFReader(model).tensors if len(t.shape) == 2}


def write_imatrix_gguf(path: Path, entries: dict[str, int]) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["unit-test.txt"])
    w.add_uint32("imatrix.chunk_count", 4)
    w.add_uint32("imatrix.chunk_size", 64)
    rng = np.random.default_rng(0)
    for name, n in entries.items():
        w.add_tensor(f"{name}.in_sum2", (4 * rng.uniform(0.5, 2.0, size=(1, n))).astype(np.float32))
        w.add_tensor(f"{name}.counts", np.full((1, 1), 4.0, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_imatrix_dat(path: Path, entries: dict[str, int]) -> Path:
    blob = struct.pack("<i", len(entries))
    for name, n in entries.items():
        raw = name.encode()
        blob += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", 3, n)
        blob += np.full(n, 3.0, dtype="<f4").tobytes()
    blob += struct.pack("<i", 3) + struct.pack("<i", 5) + b"x.txt"
    path.write_bytes(blob)
    return path


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_imatrix_types_work_with_an_importance_matrix(tiny_f32, tmp_path, fmt):
    entries = imatrix_entries(tiny_f32)
    write = write_imatrix_gguf if fmt == "gguf" else write_imatrix_dat
    matrix = write(tmp_path / f"imatrix.{fmt}", entries)
    out = tmp_path / "iq2.gguf"
    result = run_quantize(
        str(tiny_f32), QuantizeOptions(type="IQ2_XXS", out=out, imatrix=matrix, threads=1, add_to_store=False)
    )
    assert result.type == "IQ2_XXS" and gguf_info.inspect(out).quant == "IQ2_XXS"
    assert "IQ2_XXS" in tensor_types(out).values()

    from gguf import GGUFReader

    fields = GGUFReader(out).fields
    assert bytes(fields["quantize.imatrix.file"].parts[-1]).decode() == matrix.name
    assert int(fields["quantize.imatrix.entries_count"].parts[-1][0]) == len(entries)


def test_imatrix_of_another_model_fails_cleanly(runner, tiny_f32, tmp_path):
    wrong = {name: n + 32 for name, n in imatrix_entries(tiny_f32).items()}  # wrong row lengths
    matrix = write_imatrix_gguf(tmp_path / "wrong.gguf", wrong)
    outdir = tmp_path / "out"
    outdir.mkdir()
    args = ["quantize", str(tiny_f32), "-t", "IQ2_XS", "--imatrix", str(matrix), "-o", str(outdir)]
    result = runner.invoke(app, [*args, "--threads", "1"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]  # after the "quantizing ..." header: llama.cpp's reason
    assert line.startswith("error: llama.cpp could not quantize") and "imatrix size" in line
    assert listing(outdir) == set()


# -- bad input: one clear line, non-zero exit, no stray files -------------------------------
@pytest.fixture
def not_gguf(tmp_path) -> Path:
    path = tmp_path / "in" / "notes.gguf"
    path.parent.mkdir(exist_ok=True)
    path.write_text("this is not a model\n" * 10)
    return path


@pytest.fixture
def truncated(tmp_path, tiny_f32) -> Path:
    path = tmp_path / "in" / "cut.gguf"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(tiny_f32.read_bytes()[: tiny_f32.stat().st_size // 2])
    return path


def test_bad_inputs_fail_with_one_line_and_leave_nothing(
    runner, tmp_path, tiny_f32, tiny_q8, not_gguf, truncated
):
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "exists.gguf").write_bytes(b"keep me")
    cases = {
        "not a GGUF": (["quantize", str(not_gguf)], "not a GGUF file"),
        "truncated": (["quantize", str(truncated)], "truncated"),
        "unknown type": (["quantize", str(tiny_f32), "--type", "Q5_K_XL"], "unknown quantization type"),
        "needs imatrix": (["quantize", str(tiny_f32), "--type", "IQ1_S"], "needs an importance matrix"),
        "output exists": (
            ["quantize", str(tiny_f32), "--out", str(outdir / "exists.gguf")], "already exists (pass --force"
        ),
        "requantize": (["quantize", str(tiny_q8), "--type", "Q4_0"], "already quantized (Q8_0)"),
        "missing model": (["quantize", str(tmp_path / "nope.gguf")], "no such model file"),
        "no model": (["quantize"], "name a model"),
        "bad tensor type": (["quantize", str(tiny_f32), "--output-tensor-type", "q9"], "unknown tensor type"),
        "missing imatrix": (
            ["quantize", str(tiny_f32), "--imatrix", str(tmp_path / "no.dat")], "no such imatrix"
        ),
        "bad imatrix": (["quantize", str(tiny_f32), "--imatrix", str(not_gguf)], "not an imatrix"),
    }
    watched = (paths.models_dir(), outdir, not_gguf.parent, tiny_f32.parent, tiny_q8.parent)
    before = listing(*watched)
    for label, (args, expected) in cases.items():
        out_args = [] if "--out" in args else ["--out", str(outdir)]
        result = runner.invoke(app, args + out_args if len(args) > 1 else args)
        line = one_error_line(result)
        assert expected in line, (label, line)
        assert listing(*watched) == before, label
    assert (outdir / "exists.gguf").read_bytes() == b"keep me"
    assert Store().list() == []


def test_allow_requantize_and_force(runner, tiny_q8, tmp_path):
    out = tmp_path / "re.gguf"
    args = ["quantize", str(tiny_q8), "-t", "Q4_0", "--allow-requantize", "-o", str(out), "--threads", "1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "requantizing Q8_0 -> Q4_0" in first.output and gguf_info.inspect(out).quant == "Q4_0"
    assert runner.invoke(app, args).exit_code != 0
    again = runner.invoke(app, [*args, "--force"])
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["re.gguf"]


def test_interrupt_mid_run_leaves_nothing(tiny_f32, tmp_path):
    """Ctrl-C while llama.cpp runs (here: raised while handling a progress event) removes the partial file."""

    def stop(event: object) -> None:
        if isinstance(event, Progress) and event.done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        options = QuantizeOptions(type="Q4_K_M", out=tmp_path / "x.gguf", threads=1)
        run_to_end(quantize(str(tiny_f32), options), stop)
    deadline = time.time() + 30
    while any(t.name == "llama-quantize" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.iterdir()) == []
    assert Store().list() == []


def test_full_disk_and_low_memory_are_refused_before_writing(runner, tiny_f32, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from selfhost.quantize import plan

    outdir = tmp_path / "out"
    outdir.mkdir()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**9, 10**9 - 10**6, 10**6))
    result = runner.invoke(app, ["quantize", str(tiny_f32), "-o", str(outdir)])
    assert "not enough disk space" in one_error_line(result)
    monkeypatch.undo()
    monkeypatch.setattr(plan, "available_memory", lambda: 1024)
    result = runner.invoke(app, ["quantize", str(tiny_f32), "-o", str(outdir)])
    assert "not enough memory" in one_error_line(result)
    assert list(outdir.iterdir()) == []


def test_installed_executable_keeps_llama_logs_off_the_terminal(tiny_f32, tmp_path):
    import subprocess

    from tests.conftest import checkout_env, selfhost_command

    out = tmp_path / "t.gguf"
    done = subprocess.run(
        selfhost_command("quantize", str(tiny_f32), "-t", "Q5_K_M", "-o", str(out), "--threads", "1"),
        capture_output=True, text=True, env=checkout_env(), timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "tiny:Q5_K_M" in done.stdout and gguf_info.inspect(out).quant == "Q5_K_M"
    assert "llama_model" not in done.stdout + done.stderr and "converting to" not in done.stderr


def test_real_sigint_during_quantization_leaves_no_file_and_no_record(tmp_path):
    """SIGINT to `python -m selfhost quantize` while llama.cpp writes: exit 130, nothing left behind."""
    import signal
    import subprocess

    from tests.conftest import checkout_env, selfhost_command

    big = write_tiny_llama(tmp_path / "big.gguf", n_embd=1024, n_ff=2048, n_layer=2, n_head=8)
    outdir = tmp_path / "out"
    outdir.mkdir()
    command = selfhost_command("quantize", str(big), "-t", "Q6_K", "-o", str(outdir / "big-Q6_K.gguf"))
    proc = subprocess.Popen(
        [*command, "--threads", "1"],
        env=checkout_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.stat().st_size > 0 for p in outdir.glob("*.partial")):
        time.sleep(0.01)
    assert proc.poll() is None, "quantization ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert list(outdir.iterdir()) == []
    assert Store().list() == []


def test_eval_table_numbers_are_the_measured_perplexities(runner, tiny_f32, tmp_path):
    """The --eval table shows perplexity() of the input and of the output, and their difference."""
    import re

    from selfhost.quantize.perplexity import perplexity

    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and then the other one sat there too. " * 40)
    out = tmp_path / "e.gguf"
    args = ["quantize", str(tiny_f32), "-t", "Q8_0", "--out", str(out), "--threads", "1"]
    result = runner.invoke(app, [*args, "--eval", str(text), "--window", "64", "--chunks", "2"])
    assert result.exit_code == 0, result.output
    ref, quant = (
        run_to_end(perplexity(p, text.read_text(), window=64, chunks=2, threads=1, gen_tokens=0)).ppl
        for p in (tiny_f32, out)
    )
    assert ref != quant
    row = r"│ (\S+)\s+│ (F32|Q8_0)\s+│.*?│\s+([\d.]+) │\s+(reference|[+-][\d.]+) │"
    rows = re.findall(row, result.output)
    assert [(r[1], float(r[2])) for r in rows] == [
        ("F32", pytest.approx(ref, abs=1e-4)),
        ("Q8_0", pytest.approx(quant, abs=1e-4)),
    ], result.output
    assert float(rows[1][3]) == pytest.approx(quant - ref, abs=2e-4)


# -- output: progress on stderr, the result on stdout, --json ---------------------------------
def test_progress_bars_on_a_terminal_never_reach_piped_stdout(tiny_f32, tmp_path):
    """`selfhost quantize ... > out.txt` with stderr on a terminal: the bars are drawn there, and out.txt
    holds the summary only (no carriage returns, no escape sequences)."""
    import subprocess

    from tests.conftest import checkout_env, selfhost_command
    from tests.fakes.terminal import Terminal

    out = tmp_path / "p.gguf"
    env = checkout_env(TERM="xterm", COLUMNS="100")
    env.pop("NO_COLOR", None)
    with Terminal(columns=100) as term, open(tmp_path / "out.txt", "wb") as stdout:
        done = subprocess.run(
            selfhost_command("quantize", str(tiny_f32), "-t", "Q4_0", "-o", str(out), "--threads", "1"),
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=term.fd, env=env, timeout=120,
        )
    piped = (tmp_path / "out.txt").read_text()
    drawn = term.text()
    assert done.returncode == 0, drawn
    assert "\r" not in piped and "\x1b" not in piped, repr(piped)
    assert piped.splitlines()[0] == str(out) and "registered as tiny:Q4_0" in piped
    assert "quantizing tiny (F32) -> Q4_0" in drawn and "\x1b" in drawn  # the terminal did get the bars


def test_json_results_of_quantize_list_types_and_compare_parse(runner, tiny_f32, tmp_path):
    out = tmp_path / "j.gguf"
    args = ["quantize", str(tiny_f32), "-t", "Q8_0", "-o", str(out), "--threads", "1", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    value = json.loads(result.stdout)
    assert value["output"] == str(out) and value["type"] == "Q8_0" and value["name"] == "tiny:Q8_0"
    assert value["n_quantized"] == 16 and value["eval"] is None
    assert value["output_size"] == out.stat().st_size
    assert "quantizing tiny (F32) -> Q8_0" in result.stderr  # progress and notices stay on stderr

    types = json.loads(runner.invoke(app, ["quantize", "--list-types", "--json"]).stdout)
    q4 = next(t for t in types if t["name"] == "Q4_K_M")
    assert q4["ppl_increase"] == 0.1754 and q4["needs_imatrix"] is False

    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and then the other one sat there too. " * 40)
    compared = runner.invoke(app, ["compare", str(tiny_f32), str(out), "--text", str(text), "--window", "64",
                                   "--chunks", "1", "--threads", "1", "--json"])
    assert compared.exit_code == 0, compared.output
    report = json.loads(compared.stdout)
    assert [row["quant"] for row in report["rows"]] == ["F32", "Q8_0"] and report["n_windows"] == 1
    assert report["rows"][0]["reference"] is True and report["rows"][1]["ppl_increase"] is not None
