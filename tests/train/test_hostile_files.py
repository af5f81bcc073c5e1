"""Crafted checkpoints, models, images and IDX files (issue 12, items 8 and 10): refused field by
field with one line, and bounded before they are decoded."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from selfhost.errors import IntegrityError, UsageError
from selfhost.train.mnist import idx

torch = pytest.importorskip("torch")


# -- 8: GPT checkpoints ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real resumable checkpoint of a tiny GPT, made the way the trainer makes one."""
    from selfhost.train.gpt import checkpoint
    from selfhost.train.gpt.model import GPT, GPTConfig
    from selfhost.train.gpt.tokenizer import CharTokenizer

    args = GPTConfig(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=16)
    model = GPT(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros((1, 4), dtype=torch.long))[0].sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    import numpy as np

    rng = {**checkpoint.rng_state(), "sampler": np.random.default_rng(0).bit_generator.state, "ranks": []}
    payload = {
        "model_args": args.to_dict(), "config": {"block_size": 8},
        "tokenizer": CharTokenizer(list("ab")).to_json(),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": rng, "iter_num": 3, "best_val_loss": float("inf"), "val_loss": 2.5,
    }  # fmt: skip
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    checkpoint.save(path, payload)
    return checkpoint.load(path, resume=True)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = data
        for key in parents:
            target = target[key]
        target[last] = value

    return apply


def _model_tensor(key: str, make: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
    def apply(data: dict[str, Any]) -> None:
        data["model"][key] = make(data["model"][key])

    return apply


CRAFTED = [
    ("model_args.n_layer as text", _set("model_args.n_layer", "1"), "model_args.n_layer"),
    ("model_args.n_head zero", _set("model_args.n_head", 0), "model_args.n_head"),
    ("model_args.n_embd huge", _set("model_args.n_embd", 10**9), "model_args.n_embd"),
    ("model_args.vocab_size negative", _set("model_args.vocab_size", -5), "model_args.vocab_size"),
    ("model_args unknown field", _set("model_args.bias", True), "unknown field"),
    ("model_args a list", _set("model_args", [1, 2]), "model_args is not a table"),
    ("n_head does not divide", _set("model_args.n_head", 3), "does not divide"),
    ("weights NaN", _model_tensor("lm_head.weight", lambda t: t * math.nan), "NaN"),
    ("weights wrong shape", _model_tensor("wte.weight", lambda t: t[:5]), "has shape"),
    ("weights as ints", _model_tensor("wte.weight", lambda t: t.long()), "not floating point"),
    ("extra tensor", _set("model.evil", torch.zeros(3)), "unexpected tensor"),
    ("tokenizer a number", _set("tokenizer", 7), "tokenizer"),
    ("iter_num as text", _set("iter_num", "3"), "iter_num"),
    ("iter_num negative", _set("iter_num", -1), "iter_num"),
    ("best_val_loss NaN", _set("best_val_loss", math.nan), "best_val_loss"),
    ("optimizer a list", _set("optimizer", [1]), "optimizer state is malformed"),
    ("optimizer params text", _set("optimizer.param_groups", [{"params": ["a"]}]), "param_groups"),
    ("rng torch state float", _set("rng.torch", torch.zeros(5)), "rng.torch"),
    ("rng numpy keys short", _set("rng.numpy.keys", torch.zeros(3, dtype=torch.long)), "rng.numpy"),
    ("rng python truncated", _set("rng.python", (3, (1, 2), None)), "rng.python"),
    ("rng a string", _set("rng", "seed"), "rng is not a table"),
    ("scheduler a list", _set("scheduler", []), "scheduler"),
]


@pytest.mark.parametrize(("label", "damage", "needle"), CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_checkpoints_are_one_line_errors(
    good_checkpoint: dict[str, Any], tmp_path: Path, label: str, damage: Callable[..., None], needle: str
) -> None:
    import copy

    from selfhost.train.gpt import checkpoint

    data = copy.deepcopy(good_checkpoint)
    damage(data)
    path = tmp_path / "ckpt.pt"
    torch.save(data, path)
    with pytest.raises(IntegrityError) as caught:
        checkpoint.load(path, resume=True)
    message = str(caught.value)
    assert needle in message and "\n" not in message, message
    assert "is damaged" in message


def test_a_damaged_checkpoint_through_the_cli_is_one_line(good_checkpoint, tmp_path: Path, runner) -> None:  # noqa: ANN001
    import copy

    from selfhost.cli.app import app

    data = copy.deepcopy(good_checkpoint)
    data["model"]["lm_head.weight"] = data["model"]["lm_head.weight"] * math.nan
    run = tmp_path / "run"
    run.mkdir()
    torch.save(data, run / "ckpt.pt")
    for args in (["train", "sample", str(run), "-p", "a", "-m", "3"], ["train", "export", str(run)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "holds NaN" in lines[0], result.output


# -- 8: MNIST models ---------------------------------------------------------------------------
def _save_mnist(path: Path, channels: str, nan: bool = False) -> None:
    from safetensors.torch import save_file

    from selfhost.train.mnist.net import ARCH, Net

    state = {k: v.clone() for k, v in Net().state_dict().items()}
    if nan:
        state["classifier.weight"][0, 0] = math.nan
    save_file(state, str(path), metadata={"format": "selfhost-mnist", "arch": ARCH, "channels": channels})


@pytest.mark.parametrize(
    ("channels", "nan", "needle"),
    [
        ("300000,300000,300000", False, "not three widths"),
        ("32,64", False, "not three widths"),
        ("a,b,c", False, "not three widths"),
        ("0,32,64", False, "not three widths"),
        ("16,32,64", True, "NaN or infinite"),
    ],
)
def test_crafted_mnist_models_are_refused_before_allocating(
    tmp_path: Path, channels: str, nan: bool, needle: str
) -> None:
    pytest.importorskip("safetensors")
    from selfhost.train.mnist.train import load_classifier

    path = tmp_path / "model.safetensors"
    _save_mnist(path, channels, nan)
    with pytest.raises(IntegrityError, match=needle):
        load_classifier(path)


# -- 10: images and IDX bounded before decoding ------------------------------------------------
def _png(path: Path, width: int, height: int) -> None:
    """A valid all-black greyscale PNG, written row by row (a 12000x12000 one is 40 KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def test_a_huge_image_is_refused_from_its_header(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    from selfhost.train.mnist.predict import load_ink

    path = tmp_path / "huge.png"
    _png(path, 12000, 12000)
    assert path.stat().st_size < 200_000
    with pytest.raises(UsageError, match="12000x12000 pixels"):
        load_ink(path)


def test_a_large_photo_is_scaled_down_before_it_becomes_floats(tmp_path: Path) -> None:
    PIL = pytest.importorskip("PIL.Image")
    from PIL import ImageDraw

    from selfhost.train.mnist.predict import WORK_SIDE, load_ink, preprocess

    image = PIL.new("L", (3000, 2000), 255)
    ImageDraw.Draw(image).line([(1400, 500), (1500, 1500)], fill=0, width=80)
    path = tmp_path / "photo.png"
    image.save(path)
    assert max(load_ink(path).shape) == WORK_SIDE
    assert preprocess(path).shape == (28, 28)


def test_a_gzip_bomb_is_refused_after_the_limit_not_after_filling_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(idx, "MAX_IDX_BYTES", 4 * 1024 * 1024)
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    header = struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", 200_000, 28, 28)
    with gzip.open(bomb, "wb", compresslevel=1) as fh:
        fh.write(header)
        for _ in range(40):
            fh.write(b"\x00" * (1 << 20))  # 40 MiB of output from ~40 KB
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(IntegrityError, match="decompresses to more than 4 MiB"):
        idx.read_idx(bomb)
    raw = tmp_path / "raw-idx"
    raw.write_bytes(header + b"\x00" * (5 * 1024 * 1024))
    with pytest.raises(IntegrityError, match="larger than 4 MiB"):
        idx.read_idx(raw)
