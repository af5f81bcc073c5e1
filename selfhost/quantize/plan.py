"""Everything `selfhost quantize` checks before any work: the options, the input GGUF, the output path,
free disk and RAM. `plan()` turns a model name and options into a validated `QuantizeJob`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from selfhost import atomic, paths
from selfhost.errors import IntegrityError, SelfhostError, UsageError
from selfhost.quantize.types import FLOAT_TYPES, QuantType, get_type, ggml_type_id
from selfhost.runtime import gguf_info
from selfhost.runtime.memory import available_memory
from selfhost.units import human_bytes

if TYPE_CHECKING:
    from selfhost.models.resolve import ResolvedModel


class QuantizeOptions(BaseModel):
    """Everything `selfhost quantize` accepts; flags map 1:1 onto these fields."""

    type: str = "Q4_K_M"
    out: Path | None = None  # file or directory; default: models_dir()/<base>-<TYPE>.gguf
    threads: int | None = None
    allow_requantize: bool = False
    imatrix: Path | None = None
    calibration: str | None = None  # text file (or "default") to compute an imatrix from in-process
    imatrix_out: Path | None = None  # keep the computed imatrix here
    chunk_size: int = 512  # calibration tokens per chunk (llama-imatrix's default context)
    calibration_chunks: int | None = None  # at most this many chunks of the calibration text
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    leave_output_tensor: bool = False
    force: bool = False
    add_to_store: bool = True  # add the output to the local store as <base>:<TYPE>


@dataclass(frozen=True)
class QuantizeJob:
    """A validated quantization: what llama.cpp reads and writes, and how."""

    source: Path  # the input GGUF (the first part of a split one)
    input_name: str
    info: gguf_info.GGUFInfo
    qtype: QuantType
    out: Path
    name: str  # store name the output gets
    threads: int
    requantize: bool
    imatrix: Any  # a loaded --imatrix (ImatrixData), or None
    calibration: tuple[str, str] | None  # (text, dataset name) to compute the imatrix from
    output_tensor_type: int | None
    embedding_type: int | None


def plan(model: str | ResolvedModel, options: QuantizeOptions) -> QuantizeJob:
    """Validate everything before any work: options, the input, the output path, free disk and RAM."""
    from selfhost.models.names import split_tag
    from selfhost.models.resolve import resolve_model
    from selfhost.runtime.llama_backend import default_threads

    qtype = get_type(options.type)
    output_type = options.output_tensor_type
    output_tensor_type = ggml_type_id(output_type, "--output-tensor-type") if output_type else None
    embd_type = options.token_embedding_type
    embedding_type = ggml_type_id(embd_type, "--token-embedding-type") if embd_type else None
    calibration = _check_imatrix_options(qtype, options)
    if options.threads is not None and options.threads < 1:
        raise UsageError("--threads must be at least 1")

    # resolved once: by the CLI (handed down), or here for a name; a split GGUF: llama.cpp reads every part
    resolved = resolve_model(model, purpose="load") if isinstance(model, str) else model
    info = gguf_info.inspect(resolved.path)  # full validation before llama.cpp touches the file
    if info.vocab_size is None or not info.tensor_types:
        raise IntegrityError(f"{resolved.path} is not a language model GGUF (no tokenizer)")
    requantize = is_quantized(info)
    if requantize and not options.allow_requantize:
        raise UsageError(
            f"{resolved.name} is already quantized ({info.quant}); quantizing it again loses more quality "
            "than quantizing from F16/F32",
            hint="pass --allow-requantize to do it anyway, or start from an F16/BF16/F32 file",
        )
    imatrix = None
    if options.imatrix is not None:
        from selfhost.quantize.imatrix import load_imatrix

        imatrix = load_imatrix(options.imatrix)

    base = resolved.record.base if resolved.record else split_tag(resolved.name)[0]
    out = _output_path(resolved.path, base, qtype, options)
    input_size = sum(p.stat().st_size for p in resolved.parts) or info.size
    atomic.ensure_free_space(out.parent, input_size, "the quantized model")
    _check_ram(info)
    return QuantizeJob(
        source=resolved.path, input_name=resolved.name, info=info, qtype=qtype, out=out,
        name=f"{base}:{qtype.name}", threads=options.threads or default_threads(), requantize=requantize,
        imatrix=imatrix, calibration=calibration, output_tensor_type=output_tensor_type,
        embedding_type=embedding_type,
    )


def _check_imatrix_options(qtype: QuantType, options: QuantizeOptions) -> tuple[str, str] | None:
    """Check --imatrix / --calibration / --imatrix-out together; read the calibration text, if any."""
    if options.imatrix is not None and options.calibration is not None:
        raise UsageError("pass either --imatrix or --calibration, not both")
    if options.imatrix_out is not None and options.calibration is None:
        raise UsageError("--imatrix-out needs --calibration (the text to compute the imatrix from)")
    if qtype.needs_imatrix and options.imatrix is None and options.calibration is None:
        raise UsageError(
            f"{qtype.name} needs an importance matrix: at so few bits per weight llama.cpp keeps a model "
            "usable only by weighting each weight by how much it matters",
            hint="pass --calibration default (or a text file), or --imatrix FILE, or choose Q2_K / IQ3_XXS "
            "or larger",
        )
    if options.calibration is None:
        return None
    from selfhost.quantize.calibrate import calibration_text

    return calibration_text(options.calibration)  # a bad file fails before any work


def _output_path(source: Path, base: str, qtype: QuantType, options: QuantizeOptions) -> Path:
    """The checked output file (its folder made, partial files of killed runs swept)."""
    out = Path(options.out).expanduser() if options.out else default_output(base, qtype)
    if out.is_dir():
        out = out / default_output(base, qtype).name
    if out.suffix != ".gguf":
        raise UsageError(f"output {out} must end in .gguf")
    if _same_file(source, out):
        raise UsageError(f"output {out} is the input file", hint="choose another --out")
    if out.exists() and not options.force:
        raise UsageError(f"{out} already exists", hint="pass --force to overwrite it, or --out another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_orphans(out.parent)
    return out


def default_output(base: str, qtype: QuantType) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", base.replace("/", "--")).strip("-") or "model"
    return paths.models_dir() / f"{safe}-{qtype.name}.gguf"


def is_quantized(info: gguf_info.GGUFInfo) -> bool:
    return any(t not in FLOAT_TYPES for t in info.tensor_types)


def ram_needed(info: gguf_info.GGUFInfo) -> int:
    """Peak RAM of llama_model_quantize: the input is memory-mapped; per tensor it holds an F32
    copy, a work buffer and the quantized rows. Estimated from the largest tensor, usually
    the token embedding (vocab x n_embd)."""
    largest = (info.vocab_size or 0) * (info.embedding_length or 0)
    if not largest:
        largest = info.n_params // max(1, (info.n_layers or 1))
    return 3 * 4 * largest + 64 * 2**20


def _check_ram(info: gguf_info.GGUFInfo) -> None:
    free, need = available_memory(), ram_needed(info)
    if free is not None and free < need:
        raise SelfhostError(
            f"not enough memory to quantize {info.path.name}: need about {human_bytes(need)}, "
            f"{human_bytes(free)} available",
            hint="close other programs or quantize on a machine with more RAM",
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _sweep_orphans(folder: Path) -> None:
    """Partial outputs of quantize runs that were killed (kill -9, power loss) go before writing."""
    from selfhost.models.store import Store

    Store().sweep_temp_files()
    atomic.sweep_stale(folder)
