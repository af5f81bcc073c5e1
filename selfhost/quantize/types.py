"""The GGUF quantization types selfhost offers: size, published quality cost and advice.

Figures come from llama.cpp's `tools/quantize/quantize.cpp` table: the file size of Llama-3-8B
(8.03 B parameters) at each type, from which bits per weight follow, and the perplexity increase
over F16 measured on wikitext. Types the table describes only by nominal bits per weight keep
that figure and no perplexity cost. Which types exist is read from the installed llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfhost.errors import UsageError

LLAMA3_8B_PARAMS = 8.03e9

# Types llama-quantize refuses to make without an importance matrix (`--imatrix`).
IMATRIX_REQUIRED = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"})
# Input file types that are not quantized (quantizing them needs no --allow-requantize).
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})


@dataclass(frozen=True)
class QuantType:
    name: str  # "Q4_K_M": what users type; also LLAMA_FTYPE_MOSTLY_<name> in llama.cpp
    ftype: int  # llama_ftype value
    bpw: float | None  # bits per weight (Llama-3-8B file size, or nominal)
    ppl_increase: float | None  # published Llama-3-8B perplexity increase vs F16
    needs_imatrix: bool
    advice: str


def _bpw(gib: float) -> float:
    return round(gib * 2**30 * 8 / LLAMA3_8B_PARAMS, 2)


# name -> (bits per weight, Llama-3-8B ppl increase, advice)
_PUBLISHED: dict[str, tuple[float | None, float | None, str]] = {
    "F32": (32.0, None, "no quantization (full precision copy)"),
    "F16": (16.0, None, "no quantization; reference quality"),
    "BF16": (16.0, None, "no quantization; reference quality"),
    "Q8_0": (_bpw(7.96), 0.0026, "practically lossless, half the size of F16"),
    "Q6_K": (_bpw(6.14), 0.0217, "near lossless"),
    "Q5_K_M": (_bpw(5.33), 0.0569, "recommended when memory allows"),
    "Q5_K_S": (_bpw(5.21), 0.1049, "good quality"),
    "Q5_1": (_bpw(5.65), 0.1062, "legacy; prefer Q5_K_M"),
    "Q5_0": (_bpw(5.21), 0.1316, "legacy; prefer Q5_K_S"),
    "Q4_K_M": (_bpw(4.58), 0.1754, "recommended: best balance of size and quality"),
    "Q4_K_S": (_bpw(4.37), 0.2689, "smaller than Q4_K_M, a little worse"),
    "Q4_1": (_bpw(4.78), 0.4511, "legacy; prefer Q4_K_M"),
    "Q4_0": (_bpw(4.34), 0.4685, "legacy; prefer Q4_K_M (fast on ARM via repacking)"),
    "Q3_K_L": (_bpw(4.03), 0.5562, "noticeable loss; for tight memory"),
    "Q3_K_M": (_bpw(3.74), 0.6569, "noticeable loss; for tight memory"),
    "Q3_K_S": (_bpw(3.41), 1.6321, "large loss; prefer IQ3 with an imatrix"),
    "Q2_K": (_bpw(2.96), 3.5199, "very large loss; last resort"),
    "Q2_K_S": (_bpw(2.96), 3.1836, "very large loss; needs --imatrix"),
    "IQ4_NL": (4.50, None, "non-linear 4-bit; better with --imatrix"),
    "IQ4_XS": (4.25, None, "non-linear 4-bit; better with --imatrix"),
    "IQ3_M": (3.66, None, "3-bit mix; use with --imatrix"),
    "IQ3_S": (3.44, None, "3-bit; use with --imatrix"),
    "IQ3_XS": (3.30, None, "3-bit; use with --imatrix"),
    "IQ3_XXS": (3.06, None, "3-bit; use with --imatrix"),
    "IQ2_M": (2.70, None, "2-bit; use with --imatrix"),
    "IQ2_S": (2.50, None, "2-bit; needs --imatrix"),
    "IQ2_XS": (2.31, None, "2-bit; needs --imatrix"),
    "IQ2_XXS": (2.06, None, "2-bit; needs --imatrix"),
    "IQ1_M": (1.75, None, "1-bit; needs --imatrix; very large loss"),
    "IQ1_S": (1.56, None, "1-bit; needs --imatrix; very large loss"),
    "TQ2_0": (2.06, None, "only for ternary (BitNet-style) models"),
    "TQ1_0": (1.69, None, "only for ternary (BitNet-style) models"),
    "MXFP4_MOE": (4.25, None, "only for MXFP4 mixture-of-experts models (gpt-oss)"),
    "NVFP4": (4.50, None, "experimental 4-bit float"),
    "Q2_0": (2.25, None, "experimental 2-bit"),
    "Q1_0": (1.125, None, "experimental 1-bit"),
}


def _ftype_constants() -> dict[str, int]:
    """{'Q4_K_M': 15, 'F32': 0, ...}: every file type the installed llama.cpp can write."""
    from selfhost.runtime.llama_backend import llama

    lib = llama()
    found: dict[str, int] = {}
    for attr in dir(lib):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            found[attr.removeprefix("LLAMA_FTYPE_MOSTLY_")] = int(getattr(lib, attr))
        elif attr == "LLAMA_FTYPE_ALL_F32":
            found["F32"] = int(lib.LLAMA_FTYPE_ALL_F32)
    return found


def supported_types() -> list[QuantType]:
    """Every type the installed llama.cpp supports, smallest loss first (unknown cost last)."""
    types = []
    for name, ftype in _ftype_constants().items():
        bpw, ppl, advice = _PUBLISHED.get(name, (None, None, "no published figures"))
        types.append(QuantType(name, ftype, bpw, ppl, name in IMATRIX_REQUIRED, advice))
    return sorted(types, key=lambda t: (-(t.bpw or 0.0), t.name))


def get_type(name: str) -> QuantType:
    """Look up a type by name, case-insensitively ('q4_k_m' works). Raises UsageError."""
    wanted = name.strip().upper()
    aliases = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}  # as llama-quantize accepts
    wanted = aliases.get(wanted, wanted)
    for t in supported_types():
        if t.name == wanted:
            return t
    raise UsageError(
        f"unknown quantization type '{name}'",
        hint="see `selfhost quantize --list-types`",
    )


def ggml_type_id(name: str, what: str) -> int:
    """A ggml tensor type name ('q8_0', 'F16') -> its id, for --output-tensor-type and friends."""
    from gguf import GGMLQuantizationType

    try:
        kind = GGMLQuantizationType[name.strip().upper()]
    except KeyError:
        kind = None
    if kind is None or kind.name in ("I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"):
        raise UsageError(f"unknown tensor type '{name}' for {what}", hint="e.g. Q8_0, Q6_K, F16")
    return int(kind.value)
