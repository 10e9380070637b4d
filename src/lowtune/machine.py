"""What this machine can run, read from its own reports, once.

The device (a CUDA GPU and its compute capability and memory, or the CPU), the CPU's native number formats (from the
flags the CPU reports, and any cap the user put on oneDNN), which BLAS torch was built with, host memory and the C
library (and whether the user made its malloc return freed memory at once), and which optional packages are
installed. `train/resolve.py` makes every choice of a run from a `Machine`; nothing else asks torch or the OS what the
hardware is. Tests describe fake machines with the constructor.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# oneDNN's instruction-set caps, lowest first (ONEDNN_MAX_CPU_ISA); native bf16 products start at AVX512_CORE_BF16.
ONEDNN_ISAS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX512_CORE_FP16",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX512_CORE_AMX_FP16",
)
FIRST_BF16_ISA = "AVX512_CORE_BF16"
# The CPU flags that decide a run's choices (written beside them): vector width and native bf16 / fp16.
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "bf16")
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16 and AMX-BF16; Arm's BF16 extension
OPTIONAL_PACKAGES = ("bitsandbytes", "liger_kernel")


@dataclass(frozen=True)
class Cpu:
    """The host CPU as it reports itself."""

    name: str
    vendor: str  # GenuineIntel, AuthenticAMD, ARM, ...
    flags: frozenset[str]
    onednn_cap: str | None = None  # ONEDNN_MAX_CPU_ISA, when the user set it
    mkl_cap: str | None = None  # MKL_ENABLE_INSTRUCTIONS, when the user set it

    @property
    def native_bf16(self) -> bool:
        """bf16 matrix products in hardware (AVX512-BF16, AMX or Arm BF16) that oneDNN is allowed to use."""
        return bool(self.flags & NATIVE_BF16_FLAGS) and _cap_allows(self.onednn_cap, FIRST_BF16_ISA)

    @property
    def mkl_fp32_is_slow(self) -> bool:
        """MKL's fp32 products run its SSE code path: on CPUs not made by Intel (MKL checks the vendor, not the
        flags: pytorch/builder#504), or where MKL_ENABLE_INSTRUCTIONS caps it below AVX2."""
        if self.vendor in ("", "ARM") or "avx2" not in self.flags:
            return False
        capped = self.mkl_cap is not None and self.mkl_cap.upper() in ("SSE4_2", "AVX")
        return self.vendor != "GenuineIntel" or capped

    def describe(self) -> str:
        shown = [flag for flag in SHOWN_FLAGS if flag in self.flags]
        caps = [
            f"{name}={value}"
            for name, value in (("ONEDNN_MAX_CPU_ISA", self.onednn_cap), ("MKL_ENABLE_INSTRUCTIONS", self.mkl_cap))
            if value
        ]
        return f"{self.name} ({', '.join(shown) or 'no AVX2'}{'; ' + ', '.join(caps) if caps else ''})"


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: tuple[int, int]
    memory: int  # bytes

    @property
    def native_bf16(self) -> bool:
        return self.capability >= (8, 0)  # Ampere and later

    def describe(self) -> str:
        return (
            f"{self.name} (compute capability {self.capability[0]}.{self.capability[1]}, {self.memory / 2**30:.0f} GiB)"
        )


@dataclass(frozen=True)
class Machine:
    """Everything a run's choices depend on. `gpu` is None on a machine that trains on its CPU."""

    cpu: Cpu
    gpu: Gpu | None = None
    host_memory_available: int = 16 * 2**30
    packages: frozenset[str] = field(default_factory=frozenset)
    varlen_attention: bool = False  # torch.nn.attention.varlen (flash attention over packed records), on CUDA
    mkl: bool = True  # torch's BLAS is MKL
    onednn: bool = True  # torch was built with oneDNN
    local_rank: int = 0  # this process's GPU among the host's (torchrun / accelerate)
    fsdp: bool = False  # launched by accelerate with an FSDP config (FSDP then places and shards the model)
    libc: str = "glibc"  # the C library whose malloc holds host memory ("" where `platform` cannot tell)
    malloc_returns: tuple[str, ...] = ()  # the user's glibc settings that return freed blocks at once (see below)

    @property
    def cuda(self) -> bool:
        return self.gpu is not None

    def has(self, package: str) -> bool:
        return package in self.packages

    def describe(self) -> str:
        return self.gpu.describe() if self.gpu else f"CPU {self.cpu.describe()}"

    @classmethod
    def detect(cls) -> Machine:
        """This machine, read from the CPU's flags, torch's CUDA runtime and the installed packages."""
        import psutil
        import torch

        gpu = None
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(local_rank)
            gpu = Gpu(properties.name, (properties.major, properties.minor), properties.total_memory)
        return cls(
            cpu=read_cpu(),
            gpu=gpu,
            host_memory_available=psutil.virtual_memory().available,
            packages=frozenset(name for name in OPTIONAL_PACKAGES if importlib.util.find_spec(name) is not None),
            varlen_attention=gpu is not None and importlib.util.find_spec("torch.nn.attention.varlen") is not None,
            mkl=torch.backends.mkl.is_available(),
            onednn=torch.backends.mkldnn.is_available(),
            local_rank=local_rank,
            fsdp=os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"),
            libc=platform.libc_ver()[0],
            malloc_returns=malloc_return_settings(os.environ),
        )


_DETECTED: Machine | None = None


def this_machine() -> Machine:
    """`Machine.detect()`, read once per process."""
    global _DETECTED
    if _DETECTED is None:
        _DETECTED = Machine.detect()
    return _DETECTED


def read_cpu(cpuinfo: str | None = None) -> Cpu:
    """The CPU's name, vendor and flags from /proc/cpuinfo (Linux), or what `platform` knows elsewhere."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    flags = fields.get("flags") or fields.get("Features") or ""  # x86 / Arm
    vendor = fields.get("vendor_id") or ("ARM" if "Features" in fields else "")
    return Cpu(
        name=fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU",
        vendor=vendor,
        flags=frozenset(flags.split()),
        onednn_cap=os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
        mkl_cap=os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
    )


def _cap_allows(cap: str | None, isa: str) -> bool:
    if cap is None or cap.upper() in ("ALL", "DEFAULT"):
        return True
    cap = cap.upper()
    return cap in ONEDNN_ISAS and ONEDNN_ISAS.index(cap) >= ONEDNN_ISAS.index(isa)


def cache_dir() -> Path:
    """Where lowtune keeps what it builds once per machine (the converted default model, encoded data sets)."""
    return Path(os.environ.get("LOWTUNE_CACHE", Path.home() / ".cache" / "lowtune"))


# Fixed, either threshold turns off glibc's dynamic mmap threshold, so freed activations leave the process at once
# (bench/NOTES.md, "glibc's allocator and the CPU plan"); other settings (arenas, ...) leave its heap keeping them.
RETURNING_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
RETURNING_MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def malloc_return_settings(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The user's glibc malloc settings that make freed blocks go back to the OS at once: the mmap or trim threshold,
    as a variable or a GLIBC_TUNABLES tunable."""
    names = [name for name in RETURNING_MALLOC_VARIABLES if name in environ]
    tunables = environ.get("GLIBC_TUNABLES", "")
    names += [name for name in RETURNING_MALLOC_TUNABLES if name + "=" in tunables]
    return tuple(names)
