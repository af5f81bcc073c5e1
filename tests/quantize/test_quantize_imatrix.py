"""`selfhost quantize --calibration`: an importance matrix computed in-process with llama.cpp's eval callback.

On SmolLM2-135M (dequantized to F16) a Q4_K_M made with the computed imatrix has lower perplexity on
held-out Shakespeare than one made without; the written file is llama.cpp's GGUF imatrix format (read
back by llama.cpp's own GGUF parser and by the quantizer); IQ2 types work with --calibration.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from selfhost.cli.app import app
from selfhost.events import Notice, Progress, Result, run_to_end
from selfhost.models.store import Store
from selfhost.quantize.calibrate import compute_imatrix
from selfhost.quantize.flow import QuantizeOptions, run_quantize
from selfhost.quantize.imatrix import load_imatrix
from selfhost.runtime import gguf_info

CALIBRATION = ["--calibration", "default", "--chunk-size", "128", "--calibration-chunks", "2"]


def llama_cpp_gguf_summary(path: Path) -> tuple[str, list[str]]:
    """general.type and tensor names, as llama.cpp's GGUF parser (libggml gguf_init_from_file) sees them."""
    from llama_cpp import _ggml

    class InitParams(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib = _ggml.libggml
    lib.gguf_init_from_file.restype, lib.gguf_init_from_file.argtypes = (
        ctypes.c_void_p,
        [ctypes.c_char_p, InitParams],
    )
    lib.gguf_find_key.restype, lib.gguf_find_key.argtypes = ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_get_val_str.restype, lib.gguf_get_val_str.argtypes = (
        ctypes.c_char_p,
        [ctypes.c_void_p, ctypes.c_int64],
    )
    lib.gguf_get_n_tensors.restype, lib.gguf_get_n_tensors.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_file(str(path).encode(), InitParams(True, None))
    assert ctx, f"llama.cpp cannot parse {path}"
    try:
        kind = lib.gguf_get_val_str(ctx, lib.gguf_find_key(ctx, b"general.type")).decode()
        names = [lib.gguf_get_tensor_name(ctx, i).decode() for i in range(lib.gguf_get_n_tensors(ctx))]
    finally:
        lib.gguf_free(ctx)
    return kind, names


# -- a tiny model: fast checks -------------------------------------------------------------------
def test_iq2_works_with_calibration_and_the_file_is_llama_cpp_imatrix(runner, tiny_f32, tmp_path):
    kept = tmp_path / "tiny.imatrix.gguf"
    no_imatrix = runner.invoke(app, ["quantize", str(tiny_f32), "--type", "IQ2_XXS"])
    assert no_imatrix.exit_code == 2 and "--calibration default" in no_imatrix.output

    args = ["quantize", str(tiny_f32), "--type", "IQ2_XXS", *CALIBRATION, "--imatrix-out", str(kept)]
    result = runner.invoke(app, [*args, "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "importance matrix: 14 weight matrices, 256 tokens" in result.output
    assert f"importance matrix kept in {kept}" in result.output
    out_info = gguf_info.inspect(Store().get("tiny:IQ2_XXS").path)
    assert out_info.quant == "IQ2_XXS"

    kind, names = llama_cpp_gguf_summary(kept)
    assert kind == "imatrix"
    assert len(names) == 2 * 14  # 2 layers x 7 matrices, each as in llama-imatrix: .in_sum2 then .counts
    matrices = [n.removesuffix(".in_sum2") for n in names[::2]]
    assert matrices == sorted(matrices) and names[1::2] == [f"{m}.counts" for m in matrices]
    assert {"blk.0.attn_q.weight.in_sum2", "blk.1.ffn_down.weight.counts"} <= set(names)
    data = load_imatrix(kept)
    assert data.chunk_count == 2 and data.datasets == ["selfhost:calibration.txt"]
    assert data.values["blk.0.ffn_down.weight"].shape == (512,)
    assert data.values["blk.0.attn_q.weight"].shape == (256,)
    assert all(np.isfinite(v).all() and (v > 0).all() for v in data.values.values())

    # the kept file feeds llama.cpp's quantizer again, as llama-imatrix's files do
    again = run_quantize(
        str(tiny_f32),
        QuantizeOptions(type="IQ2_XS", imatrix=kept, out=tmp_path / "xs.gguf", threads=1, add_to_store=False),
    )
    assert gguf_info.inspect(again.output).quant == "IQ2_XS" and again.imatrix == kept


def test_collector_sums_squared_activations_per_column(tiny_f32, tmp_path):
    """counts = tokens seen; in_sum2 / counts = mean squared input, finite and positive per column."""
    text = "the quick brown fox " * 200
    out = tmp_path / "m.gguf"
    events = list(compute_imatrix(tiny_f32, text, out, chunk_size=64, max_chunks=3, threads=1))
    assert isinstance(events[0], Notice) and "3 chunks of 64 tokens" in events[0].message
    chunks = [e for e in events if isinstance(e, Progress)]
    assert [c.done for c in chunks] == [1, 2, 3] and {c.total for c in chunks} == {3}
    assert chunks[-1].metrics["eta_seconds"] == 0
    written = events[-1]
    assert isinstance(written, Result) and (written.value.n_tokens, written.value.n_chunks) == (192, 3)
    assert isinstance(events[-2], Notice) and "192 tokens" in events[-2].message

    from gguf import GGUFReader

    tensors = {t.name: np.asarray(t.data) for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert set(np.unique(tensors["blk.0.attn_k.weight.counts"])) == {192.0}
    # q, k and v read the same normalised input: the same sums
    np.testing.assert_allclose(tensors["blk.1.attn_q.weight.in_sum2"], tensors["blk.1.attn_v.weight.in_sum2"])


def test_bad_calibration_input(runner, tiny_f32, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    cases = {
        "both": (["--imatrix", str(short), "--calibration", "default"], "either --imatrix or --calibration"),
        "short": (["--calibration", str(short)], "calibration text is too short"),
        "missing": (["--calibration", str(tmp_path / "none.txt")], "no such text file"),
        "out alone": (["--imatrix-out", str(tmp_path / "x.gguf")], "--imatrix-out needs --calibration"),
    }
    for label, (flags, expected) in cases.items():
        result = runner.invoke(app, ["quantize", str(tiny_f32), "-t", "Q4_K_M", *flags])
        assert result.exit_code != 0 and "Traceback" not in result.output, label
        assert expected in result.output, (label, result.output)
    assert Store().list() == [] and not (tmp_path / "x.gguf").exists()


# -- SmolLM2: the imatrix improves a real model ------------------------------------------------------
@pytest.mark.slow
def test_imatrix_lowers_perplexity_of_smollm2(runner, smollm2_gguf, shared_data, tmp_path):
    from selfhost.quantize.dequantize import dequantize_gguf
    from selfhost.quantize.perplexity import perplexity

    f16 = dequantize_gguf(smollm2_gguf, tmp_path / "smollm2-f16.gguf")
    kept = tmp_path / "smollm2.imatrix.gguf"
    with_imatrix = tmp_path / "with.gguf"
    args = ["quantize", str(f16), "-t", "Q4_K_M", *CALIBRATION, "--imatrix-out", str(kept)]
    args += ["-o", str(with_imatrix)]
    result = runner.invoke(app, [*args, "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert "importance matrix: 210 weight matrices" in result.output  # 30 layers x 7 matrices
    assert llama_cpp_gguf_summary(kept)[0] == "imatrix"
    without = run_quantize(
        str(f16), QuantizeOptions(type="Q4_K_M", out=tmp_path / "without.gguf", threads=2, add_to_store=False)
    ).output
    fields = __import__("gguf").GGUFReader(with_imatrix).fields
    assert int(fields["quantize.imatrix.entries_count"].parts[-1][0]) == 210

    held_out = (shared_data / "tinyshakespeare" / "input.txt").read_text()[-20_000:]
    ppl = {
        name: run_to_end(perplexity(path, held_out, window=128, chunks=3, threads=2, gen_tokens=0)).ppl
        for name, path in (("with imatrix", with_imatrix), ("without", without))
    }
    print(f"SmolLM2 Q4_K_M perplexity on held-out Shakespeare: {ppl}")
    assert ppl["with imatrix"] < ppl["without"]
