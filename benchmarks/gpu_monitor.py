"""Background NVML sampler: how busy the GPU was and how much memory it used while code ran.

NVML sees the whole device, every process on it, so the numbers hold for a server in another
process too. ``utilization.gpu`` is NVML's share of each sample period in which at least one
kernel ran on the device (not how many SMs it kept busy).
"""

from __future__ import annotations

import threading
from types import ModuleType, TracebackType

import numpy as np

GIB = 1024**3


def nvml() -> ModuleType | None:
    """``pynvml``, initialised; None where the package (nvidia-ml-py) or the driver is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    return pynvml


class GpuMonitor:
    """``with GpuMonitor(index) as gpu: ...`` samples GPU ``index`` every ``interval_s`` on a
    thread; ``gpu.summary()`` afterwards. Without NVML nothing is sampled and every value is None."""

    def __init__(self, index: int = 0, interval_s: float = 0.1) -> None:
        self._nvml = nvml()
        self._handle = None if self._nvml is None else self._nvml.nvmlDeviceGetHandleByIndex(index)
        self.name: str | None = None if self._nvml is None else self._nvml.nvmlDeviceGetName(self._handle)
        self._interval_s = interval_s
        self._busy_pct: list[int] = []
        self._used_bytes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="gpu-monitor", daemon=True)

    def __enter__(self) -> GpuMonitor:
        if self._nvml is not None:
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._nvml is not None:
            self._nvml.nvmlShutdown()

    def _sample(self) -> None:
        while True:
            self._busy_pct.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            self._used_bytes.append(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            if self._stop.wait(self._interval_s):
                return

    def summary(self) -> dict[str, float | int | None]:
        """Mean and p95 of the busy share in %, peak used memory in GiB, number of samples."""
        if not self._busy_pct:
            return {"gpu_busy_mean_pct": None, "gpu_busy_p95_pct": None, "gpu_memory_peak_gib": None, "gpu_samples": 0}
        busy = np.asarray(self._busy_pct, dtype=float)
        return {
            "gpu_busy_mean_pct": round(float(busy.mean()), 1),
            "gpu_busy_p95_pct": round(float(np.percentile(busy, 95)), 1),
            "gpu_memory_peak_gib": round(max(self._used_bytes) / GIB, 2),
            "gpu_samples": len(busy),
        }
