"""Kernel trace of a running server, for `benchmarks/gpu_load.sh` (TRACE_CLIENTS): Python imports
this at start-up when the folder is on PYTHONPATH. Once the file $KERNEL_TRACE_TRIGGER appears, it
records every CUDA kernel and copy of the process (all threads, CUDA graph replays included) for
$KERNEL_TRACE_SECONDS and writes a Chrome trace to $KERNEL_TRACE_OUT; `benchmarks/trace_summary.py`
reads it. Nothing happens without KERNEL_TRACE_TRIGGER.

The profiler must start in the thread that first imported torch (Kineto refuses another), so the
recording thread imports torch before the program does; start-up waits for that import."""

import os
import threading
import time


def _record(imported: threading.Event, trigger: str, seconds: float, out: str) -> None:
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    finally:
        imported.set()  # start-up goes on either way
    while not os.path.exists(trigger):
        time.sleep(0.02)
    activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU  # CPU: to try it out
    with profile(activities=[activity]) as trace:
        time.sleep(seconds)
    trace.export_chrome_trace(out + ".part")
    os.replace(out + ".part", out)  # whole once it appears


if os.environ.get("KERNEL_TRACE_TRIGGER"):
    _imported = threading.Event()
    threading.Thread(
        target=_record,
        args=(_imported, os.environ["KERNEL_TRACE_TRIGGER"], float(os.environ.get("KERNEL_TRACE_SECONDS", "3")),
              os.environ.get("KERNEL_TRACE_OUT", "kernel_trace.json")),
        name="kernel-trace", daemon=True,
    ).start()
    _imported.wait()
