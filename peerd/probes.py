"""What this machine has: CPU, memory, GPUs (NVML), and its measured base capacity C⁰.

Seed §3.2 step 1 ("every node reports its compute capacity and load") and docs/design.md §4:
C⁰ is in work units per second; peerd's work unit is one GFLOP, so C⁰ is GFLOP/s as
measured by a short float32 matmul calibration at start (per device). The daemon
never imports TensorFlow: the CPU is calibrated with numpy, and GPUs are rated from
NVML (2 FLOP × CUDA cores × max SM clock: a peak figure, documented as such).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    model: str
    vram_total_mb: int
    vram_free_mb: int
    util_pct: float
    gflops: float


@dataclass(frozen=True)
class CpuInfo:
    cores: int
    model: str


def cpu_info() -> CpuInfo:
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return CpuInfo(cores=psutil.cpu_count(logical=True) or 1, model=model[:128])


def memory_mb() -> tuple[int, int]:
    vm = psutil.virtual_memory()
    return vm.total // (1 << 20), vm.available // (1 << 20)


def gpu_info() -> list[GpuInfo]:
    """GPUs through NVML. No driver, no library, any NVML error → no GPUs, never an error."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    gpus: list[GpuInfo] = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except pynvml.NVMLError:
                util = 0.0
            gpus.append(
                GpuInfo(
                    index=i,
                    model=(name.decode() if isinstance(name, bytes) else str(name))[:128],
                    vram_total_mb=int(mem.total) // (1 << 20),
                    vram_free_mb=int(mem.free) // (1 << 20),
                    util_pct=min(100.0, max(0.0, util)),
                    gflops=_gpu_peak_gflops(pynvml, h),
                )
            )
    except pynvml.NVMLError as exc:
        log.warning("NVML failed while listing GPUs: %s", exc)
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    return gpus


def _gpu_peak_gflops(pynvml: object, handle: object) -> float:
    try:
        cores = int(pynvml.nvmlDeviceGetNumGpuCores(handle))  # type: ignore[attr-defined]
        clock_mhz = int(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM))  # type: ignore[attr-defined]
    except Exception:  # older drivers lack GetNumGpuCores
        return 0.0
    return 2.0 * cores * clock_mhz / 1000.0


def calibrate_cpu_gflops(seconds: float = 0.5, n: int = 256) -> float:
    """Sustained float32 matmul GFLOP/s of this process (numpy/BLAS), best of repeated runs.

    Best-of rather than mean: on a shared, noisy machine the fastest run is the closest
    to what the hardware can do, and it makes C⁰ more stable between restarts.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: BLAS thread pool start, page faults
    best = 0.0
    deadline = time.perf_counter() + seconds
    runs = 0
    while runs < 3 or (time.perf_counter() < deadline and runs < 10_000):
        t0 = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t0
        runs += 1
        if dt > 0:
            best = max(best, 2.0 * n**3 / dt / 1e9)
    return round(best, 3)


def offered_cores(config_cores: int | None) -> int:
    total = os.cpu_count() or 1
    return total if config_cores is None else max(0, min(config_cores, total))
