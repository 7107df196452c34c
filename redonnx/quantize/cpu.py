"""What this CPU's int8 kernels are: which vector instructions onnxruntime's MLAS can use.

onnxruntime picks its int8 GEMM kernel by instruction set: AVX2 multiplies unsigned by signed bytes
with ``vpmaddubsw``, whose 16-bit pair sums saturate when both 8-bit weights of a pair are large
(onnxruntime's quantization guide: use ``reduce_range``, 7-bit weights, on AVX2 and AVX-512 without
VNNI); AVX-512 VNNI / AVX-VNNI (``vpdpbusd``) and AMX accumulate in 32 bits and take full-range
weights. Which of them are present decides the weight range and is stated in every report, since
the same model quantized here can run at a different speed, or not faster at all, elsewhere.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Int8Cpu:
    """The int8-relevant features of this CPU."""

    arch: str
    avx2: bool = False
    avx512: bool = False
    vnni: bool = False  # avx512_vnni or avx_vnni: 32-bit accumulation of u8 x s8
    amx: bool = False

    @property
    def reduce_range(self) -> bool:
        """7-bit weights: x86 without VNNI saturates u8 x s8 pair sums at full range."""
        return self.arch == "x86_64" and not (self.vnni or self.amx)

    def describe(self) -> str:
        if self.arch != "x86_64":
            return f"{self.arch} (int8 kernels of this architecture)"
        kernel = "AMX" if self.amx else "VNNI" if self.vnni else "AVX-512 (no VNNI)" if self.avx512 else (
            "AVX2 (no VNNI)" if self.avx2 else "SSE")  # fmt: skip
        weights = "7-bit weights (reduce_range: u8 x s8 pairs saturate without VNNI)" if self.reduce_range else (
            "8-bit weights")  # fmt: skip
        return f"x86-64, int8 kernels: {kernel}; {weights}"

    def to_dict(self) -> dict[str, object]:
        return {"arch": self.arch, "avx2": self.avx2, "avx512": self.avx512, "vnni": self.vnni, "amx": self.amx,
                "reduce_range": self.reduce_range, "describe": self.describe()}  # fmt: skip


def _flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def detect() -> Int8Cpu:
    """This machine's int8 features (``/proc/cpuinfo`` flags; none known elsewhere)."""
    arch = platform.machine().lower()
    arch = "x86_64" if arch in ("x86_64", "amd64") else arch
    f = _flags()
    return Int8Cpu(arch=arch, avx2="avx2" in f, avx512="avx512f" in f,
                   vnni=bool({"avx512_vnni", "avx_vnni"} & f), amx="amx_int8" in f)  # fmt: skip
