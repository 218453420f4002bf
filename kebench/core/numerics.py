"""What a number depends on beyond model, data and hyperparameters: the hardware and the floating-point path.

A CPU's float results depend on which SIMD kernels run: ATen dispatches its vectorized kernels at the best
level the CPU has (``torch.backends.cpu.get_cpu_capability()``), MKL picks a GEMM code branch per CPU (and
vendor), oneDNN its ISA.  Rounding differences flip early-stopping decisions and a stream of edits diverges
(issue 30: BaFT continual T = 10 on SmolLM2 moved from Rel 0.77 to 0.65 on one machine).  Two settings:

- ``native``: whatever the machine and environment give (fastest; numbers hold on this CPU only);
- ``portable``: set before torch loads, ATen's dispatch level ``avx2`` (``ATEN_CPU_CAPABILITY``), MKL's
  conditional numerical reproducibility branch ``COMPATIBLE`` (``MKL_CBWR``) and oneDNN's maximum ISA
  ``AVX2`` (``ONEDNN_MAX_CPU_ISA``), so a CPU cell gives the same numbers on any x86-64 CPU with AVX2.

Why MKL ``COMPATIBLE`` and not ``AVX2``: MKL honours its per-ISA branches on Intel processors only.  On this
machine's AMD EPYC, ``MKL_CBWR=AVX2`` (with or without ``,STRICT``) is reported by MKL itself as
``CNR:AUTO`` (MKL still picks the branch for the CPU it finds; SGEMM results of the shapes tried were bit for
bit those of no setting), so an Intel AVX2 machine would run another branch; ``COMPATIBLE`` is the one branch
MKL gives on Intel and non-Intel processors alike (SGEMM 2-3 times slower here; ``bench/numerics_cost.py``
measures what that costs per edit).  ``COMPATIBLE,STRICT`` was tried too: MKL accepts it and the tiny-model
continual cell (T = 4, n = 8, one thread) gives the very rows of ``COMPATIBLE``, so ``STRICT`` is left out.  What ``portable`` cannot promise: the same numbers under another torch
thread count (sums are ordered by thread), another torch/MKL version, another torch build, or a GPU.

Every setting is an environment variable, read by ATen, MKL and oneDNN once, when they first run; so they
are set before torch is imported (``apply_numerics``: ``kebench edit``; Ray workers get them through their
runtime environment) and checked afterwards (``verify_numerics``: ATen's level and MKL's own report of its
branch), a setting that did not take effect being a one-line error.

``hardware_record`` is what every result row stores (CPU model, the ISA torch dispatches to, BLAS, MKL and
oneDNN versions, MKL's branch, the numerics environment, thread counts; on a GPU the device, driver, CUDA,
cuDNN and the TF32/reduced-precision and determinism settings) and ``hardware_label`` its one-line form,
which the tables and the leaderboard group by.  torch is imported inside the functions that need it: the
results layer imports this module to read records and must not load torch.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

from kebench.core.errors import KebenchError

NATIVE, PORTABLE = "native", "portable"
NUMERICS_CHOICES = (NATIVE, PORTABLE)
#: The numerics a grid without ``numerics:`` and ``kebench edit`` without ``--numerics`` run under.  Flip to
#: PORTABLE with bench/numerics_cost.py's number in hand: grids that do not name ``numerics`` then expand to
#: portable cells, which have ids of their own (their native cells stay in the store, unused).
DEFAULT_NUMERICS = NATIVE
#: the environment variable that says which numerics a process was started under
MODE_ENV = "KEBENCH_NUMERICS"


@dataclass(frozen=True)
class IsaSettings:
    """One floating-point path: ATen's dispatch level, MKL's CNR branch and oneDNN's maximum ISA."""

    aten: str  # ATEN_CPU_CAPABILITY: default | avx2 | avx512
    mkl_cbwr: str  # MKL_CBWR: COMPATIBLE | AVX2 | AVX512 ...
    onednn: str  # ONEDNN_MAX_CPU_ISA: SSE41 | AVX2 | AVX512_CORE ...

    def env(self) -> dict[str, str]:
        return {"ATEN_CPU_CAPABILITY": self.aten, "MKL_CBWR": self.mkl_cbwr, "ONEDNN_MAX_CPU_ISA": self.onednn}


#: ``portable``: see the module docstring for why MKL takes COMPATIBLE
PORTABLE_ISA = IsaSettings("avx2", "COMPATIBLE", "AVX2")
#: the ISA levels ``kebench noise --isa`` can force (beside ``native`` and ``portable``); each sets all three
#: libraries to that level, as a CPU that has nothing better would run
ISA_LEVELS: dict[str, IsaSettings] = {
    "default": IsaSettings("default", "COMPATIBLE", "SSE41"),
    "avx2": IsaSettings("avx2", "AVX2", "AVX2"),
    "avx512": IsaSettings("avx512", "AVX512", "AVX512_CORE"),
}
#: what torch reports (``get_cpu_capability``) for each ATen level
ATEN_REPORTS = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}
#: the environment variables a CPU or GPU number depends on, recorded in every row when set
NUMERICS_ENV = (MODE_ENV, "ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "CUBLAS_WORKSPACE_CONFIG", "NVIDIA_TF32_OVERRIDE")
#: the CPU flags that decide which kernels can run
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def check_numerics(value: Any, where: str = "numerics") -> str:
    """``value`` as a numerics mode, or a one-line error naming ``where``."""
    if value not in NUMERICS_CHOICES:
        raise KebenchError(f"{where} must be one of {', '.join(NUMERICS_CHOICES)}, got {value!r}")
    return value


def numerics_env(mode: str) -> dict[str, str]:
    """The environment a process computes ``mode``'s numbers under (to be set before torch loads)."""
    check_numerics(mode)
    if mode == PORTABLE:
        return {MODE_ENV: PORTABLE, **PORTABLE_ISA.env()}
    return {MODE_ENV: NATIVE}


def isa_env(level: str) -> dict[str, str]:
    """The environment that forces ISA ``level`` (``ISA_LEVELS``) in a native process; {} for ``native``."""
    if level == NATIVE:
        return {}
    if level not in ISA_LEVELS:
        raise KebenchError(f"--isa: unknown level {level!r}; known: native, portable, {', '.join(ISA_LEVELS)}")
    return ISA_LEVELS[level].env()


def apply_numerics(mode: str) -> bool:
    """Set ``mode``'s environment in this process; True when torch was imported already (the settings may then
    come too late: ``verify_numerics`` says)."""
    os.environ.update(numerics_env(mode))
    return "torch" in sys.modules


def process_numerics() -> str:
    """The numerics this process was started under (``native`` unless told otherwise)."""
    return os.environ.get(MODE_ENV) or NATIVE


def verify_numerics(mode: str) -> None:
    """A one-line ``KebenchError`` unless this process computes under ``mode``: for ``portable``, torch must
    dispatch at AVX2 and MKL report the COMPATIBLE branch; a process started under one mode never computes a
    cell of the other."""
    check_numerics(mode)
    running = process_numerics()
    if running != mode:
        raise KebenchError(f"numerics {mode} requested but this process was started under {running} "
                           f"({MODE_ENV}={os.environ.get(MODE_ENV, '')!r}); start it with numerics {mode}")
    if mode != PORTABLE:
        return
    import torch  # off the results layer's import path

    isa = torch.backends.cpu.get_cpu_capability()
    wanted = ATEN_REPORTS[PORTABLE_ISA.aten]
    if isa != wanted:
        raise KebenchError(f"numerics portable did not take effect: torch dispatches at {isa}, not {wanted} "
                           f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '')!r} must be set before "
                           "torch first runs, and the CPU must have AVX2)")
    branch = mkl_branch()
    if branch is not None and branch.split(",")[0] != PORTABLE_ISA.mkl_cbwr:
        raise KebenchError(f"numerics portable did not take effect: MKL reports CNR branch {branch}, not "
                           f"{PORTABLE_ISA.mkl_cbwr} (MKL_CBWR={os.environ.get('MKL_CBWR', '')!r} must be set before "
                           "MKL first runs)")


# --------------------------------------------------------------------------- the hardware record

def hardware_record() -> dict[str, Any]:
    """This process's hardware and floating-point path, as every result row stores it (JSON-ready)."""
    import torch  # off the results layer's import path

    record: dict[str, Any] = {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "cpu_flags": _cpu_flags(),
        "cpus": _cpus(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "blas": _build_setting("BLAS_INFO"),
        "mkl": mkl_version(),
        "mkl_cnr": mkl_branch(),
        "onednn": onednn_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "numerics": process_numerics(),
        "env": {name: os.environ[name] for name in NUMERICS_ENV if name in os.environ},
    }
    if torch.cuda.is_available():
        record["gpu"] = gpu_record()
    return record


def hardware_label(record: Mapping[str, Any] | None) -> str:
    """One line naming what decides the numbers (cells with the same label are comparable bit for bit)."""
    if not record:
        return "not recorded"
    threads = record.get("threads")
    parts = [str(record.get("cpu") or "unknown CPU"), f"torch {record.get('torch', '?')}",
             f"ISA {record.get('isa', '?')}"]
    if record.get("mkl") or record.get("mkl_cnr"):
        parts.append(f"MKL {record.get('mkl') or '?'} CNR {record.get('mkl_cnr') or '?'}")
    elif record.get("blas"):
        parts.append(f"BLAS {record['blas']}")
    parts.append(f"{record.get('numerics', NATIVE)} numerics")
    if threads is not None:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    gpu = record.get("gpu")
    if gpu:
        tf32 = "TF32 on" if gpu.get("tf32_matmul") else "TF32 off"
        parts.append(f"GPU {gpu.get('name', '?')} (driver {gpu.get('driver') or '?'}, CUDA {gpu.get('cuda') or '?'}, "
                     f"{tf32})")
    return " · ".join(parts)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    for line in _cpuinfo().splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            return handle.read(1 << 16)
    except OSError:
        return ""


def _cpu_flags() -> list[str]:
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in _CPU_FLAGS if flag in present]
    return []


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def _torch_config() -> str:
    import torch

    try:
        return torch.__config__.show()
    except Exception:  # noqa: BLE001 - a build without the summary
        return ""


def _build_setting(name: str) -> str | None:
    match = re.search(rf"{name}=([^,\s]+)", _torch_config())
    return match.group(1) if match else None


def onednn_version() -> str | None:
    """oneDNN's version, from torch's build summary (``Intel(R) MKL-DNN v3.12.0``)."""
    match = re.search(r"(?:MKL-DNN|oneDNN)\s+v?([0-9][0-9.]*)", _torch_config())
    return match.group(1) if match else None


@functools.lru_cache(maxsize=1)
def _mkl_library() -> Any:
    """The library torch's MKL is linked into (statically, in libtorch_cpu), or None."""
    import torch

    if not torch.backends.mkl.is_available():
        return None
    folder = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None


@functools.lru_cache(maxsize=1)
def mkl_version() -> str | None:
    """MKL's own version string (``MKL_Get_Version_String``), shortened; None without MKL."""
    lib = _mkl_library()
    if lib is None or not hasattr(lib, "MKL_Get_Version_String"):
        return None
    buffer = ctypes.create_string_buffer(256)
    lib.MKL_Get_Version_String(buffer, len(buffer))
    text = buffer.value.decode("ascii", errors="replace")
    match = re.search(r"(\d{4}\.\d+(?:\.\d+)?(?: Update \d+)?)", text)
    return match.group(1) if match else text.strip()[:60]


@functools.lru_cache(maxsize=1)
def mkl_branch() -> str | None:
    """The CNR branch MKL runs (``COMPATIBLE``, ``AUTO``, ``OFF``, with ``,STRICT``), as MKL itself reports it:
    one 2×2 SGEMM with MKL's verbose mode on, its line read from a redirected stdout.  None without MKL.

    Asked once per process: MKL fixes its branch when it first runs."""
    lib = _mkl_library()
    if lib is None or not hasattr(lib, "MKL_Verbose"):
        return None
    import torch

    try:
        sys.stdout.flush()
        with tempfile.TemporaryFile() as captured:
            saved = os.dup(1)
            try:
                os.dup2(captured.fileno(), 1)
                previous = lib.MKL_Verbose(1)
                try:
                    torch.mm(torch.ones(2, 2), torch.ones(2, 2))
                finally:
                    lib.MKL_Verbose(previous if previous in (0, 1, 2) else 0)
            finally:
                os.dup2(saved, 1)
                os.close(saved)
            captured.seek(0)
            text = captured.read().decode("ascii", errors="replace")
    except (OSError, ValueError):  # no stdout to borrow (a closed descriptor): the branch stays unknown
        return None
    match = re.search(r"CNR:(\S+)", text)
    return match.group(1) if match else None


def gpu_record() -> dict[str, Any]:
    """The GPU a CUDA cell runs on and the settings its float results depend on."""
    import torch

    index = torch.cuda.current_device()
    matmul = torch.backends.cuda.matmul
    return {
        "name": torch.cuda.get_device_name(index),
        "capability": ".".join(str(part) for part in torch.cuda.get_device_capability(index)),
        "count": torch.cuda.device_count(),
        "driver": _nvidia_driver(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_matmul": bool(getattr(matmul, "allow_tf32", False)),
        "tf32_cudnn": bool(getattr(torch.backends.cudnn, "allow_tf32", False)),
        "fp16_reduced_precision": bool(getattr(matmul, "allow_fp16_reduced_precision_reduction", False)),
        "bf16_reduced_precision": bool(getattr(matmul, "allow_bf16_reduced_precision_reduction", False)),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def _nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version (Linux), None where it cannot be read."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as handle:
            match = re.search(r"Kernel Module\s+([0-9.]+)", handle.read())
        return match.group(1) if match else None
    except OSError:
        return None
