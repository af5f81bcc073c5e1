"""KV-cache settings of a llama.cpp context: the K and V element types and flash attention.

llama.cpp stores K and V in F16 by default; q8_0 halves them (34 bytes per 32 values), q4_0 nearly
quarters them (18 bytes per 32). A quantized V cache needs flash attention: llama.cpp refuses the
context otherwise, so we refuse such settings first, in one line.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from selfhost.errors import UsageError

CacheType = Literal["f16", "q8_0", "q4_0"]
FlashAttn = Literal["auto", "on", "off"]

# name -> (ggml_type, bytes per element: a block's bytes / its 32 values for the quantized types)
CACHE_TYPES: dict[str, tuple[int, float]] = {"f16": (1, 2.0), "q8_0": (8, 34 / 32), "q4_0": (2, 18 / 32)}
FLASH_ATTN: dict[str, int] = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type


class KVSettings(BaseModel):
    """--cache-type-k, --cache-type-v and --flash-attn."""

    type_k: CacheType = "f16"
    type_v: CacheType = "f16"
    flash_attn: FlashAttn = "auto"

    def check(self) -> KVSettings:
        """Refuse what llama.cpp would refuse (quantized V without flash attention). Returns self."""
        for flag, name in (("--cache-type-k", self.type_k), ("--cache-type-v", self.type_v)):
            if name not in CACHE_TYPES:
                raise UsageError(f"{flag} {name} is not a KV-cache type", hint="use f16, q8_0 or q4_0")
        if self.flash_attn not in FLASH_ATTN:
            raise UsageError(f"--flash-attn {self.flash_attn} is not one of on, off, auto")
        if self.type_v != "f16" and self.flash_attn == "off":
            raise UsageError(
                f"a quantized V cache (--cache-type-v {self.type_v}) needs flash attention",
                hint="use --flash-attn on (or auto), or --cache-type-v f16",
            )
        return self

    def bytes_per_element(self) -> tuple[float, float]:
        return CACHE_TYPES[self.type_k][1], CACHE_TYPES[self.type_v][1]

    def apply(self, params: object) -> None:
        """Set type_k / type_v / flash_attn_type on llama_context_params."""
        params.type_k = CACHE_TYPES[self.type_k][0]  # type: ignore[attr-defined]
        params.type_v = CACHE_TYPES[self.type_v][0]  # type: ignore[attr-defined]
        params.flash_attn_type = FLASH_ATTN[self.flash_attn]  # type: ignore[attr-defined]

    def label(self) -> str:
        """'' for the default, else e.g. 'KV q8_0/q8_0'."""
        if self.type_k == self.type_v == "f16":
            return ""
        return f"KV {self.type_k}/{self.type_v}"
