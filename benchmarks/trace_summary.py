"""Where the GPU's time went in a kernel trace (`benchmarks/load.py --kernel-trace`, a Chrome trace of CUDA
activity): how busy the GPU and each CUDA stream were, overall and per time bin, and each stream's
largest kernels, so that a stream can be told apart (LLM, TTS decoder, codec, encoders).

    python -m benchmarks.trace_summary trace.json --bin-ms 100 --json summary.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def busy_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def clip(spans: list[tuple[float, float]], low: float, high: float) -> list[tuple[float, float]]:
    return [(max(s, low), min(e, high)) for s, e in spans if e > low and s < high]


def summarize(events: list[dict], bin_ms: float) -> dict:
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES and "dur" in e]
    if not gpu:
        raise SystemExit("no GPU activity in the trace")
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    kernel_time: dict[str, Counter] = defaultdict(Counter)
    for e in gpu:
        stream = str(e.get("args", {}).get("stream", "?"))
        spans[stream].append((e["ts"], e["ts"] + e["dur"]))
        kernel_time[stream][e["name"][:60]] += e["dur"]
    everything = [s for per in spans.values() for s in per]
    begin, end = min(s for s, _ in everything), max(e for _, e in everything)
    wall = end - begin
    streams = sorted(spans, key=lambda k: -busy_us(spans[k]))
    bins = []
    step = bin_ms * 1000
    t = begin
    while t < end:
        row = {"start_ms": round((t - begin) / 1000, 1),
               "gpu": round(busy_us(clip(everything, t, t + step)) / step, 3)}
        row.update({s: round(busy_us(clip(spans[s], t, t + step)) / step, 3) for s in streams})
        bins.append(row)
        t += step
    return {
        "wall_ms": round(wall / 1000, 1),
        "gpu_busy": round(busy_us(everything) / wall, 3),
        "streams": {
            s: {
                "busy": round(busy_us(spans[s]) / wall, 3),
                "activities": len(spans[s]),
                "top_kernels_ms": {k: round(v / 1000, 1) for k, v in kernel_time[s].most_common(4)},
            }
            for s in streams
        },
        "bins": bins,
    }


def print_summary(summary: dict) -> None:
    print(f"window {summary['wall_ms']} ms, GPU busy (any stream) {summary['gpu_busy']:.0%}")
    for stream, info in summary["streams"].items():
        tops = "; ".join(f"{k} {v}" for k, v in info["top_kernels_ms"].items())
        print(f"stream {stream}: busy {info['busy']:.0%}, {info['activities']} activities; largest (ms): {tops}")
    streams = list(summary["streams"])
    print("| ms | GPU | " + " | ".join(f"s{s}" for s in streams) + " |")
    print("|---:|---:|" + "---:|" * len(streams))
    for row in summary["bins"]:
        print(f"| {row['start_ms']:.0f} | {row['gpu']:.0%} | " + " | ".join(f"{row[s]:.0%}" for s in streams) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--bin-ms", type=float, default=100.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = json.loads(args.trace.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    summary = summarize(events, args.bin_ms)
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
