"""Dequantize a GGUF model to F16 (or F32) with the `gguf` package, keeping all its metadata.

This makes a high-precision reference from a quantized file (e.g. the embedded SmolLM2 Q4_1):
the reference for quality reports, and an input `selfhost quantize` accepts without
`--allow-requantize`. It cannot recover what the original quantization lost.
"""

from __future__ import annotations

from pathlib import Path

from selfhost import atomic
from selfhost.runtime import gguf_info


def dequantize_gguf(src: Path, dest: Path, dtype: str = "f16") -> Path:
    """Write `src` with every weight matrix as `dtype` ('f16' or 'f32'); 1-D tensors stay F32."""
    import gguf
    import numpy as np

    if dtype not in ("f16", "f32"):
        raise ValueError(f"dtype must be 'f16' or 'f32', not {dtype!r}")
    info = gguf_info.inspect(src)
    reader = gguf.GGUFReader(src)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
    with atomic.atomic_path(Path(dest)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), info.architecture)
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture" or not field.types:
                continue
            if name == "general.file_type":
                writer.add_file_type(file_type)
                continue
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type)
        for t in reader.tensors:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            if values.ndim >= 2 and dtype == "f16":
                values = values.astype(np.float16)
            else:
                values = values.astype(np.float32)
            writer.add_tensor(t.name, values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(dest)
