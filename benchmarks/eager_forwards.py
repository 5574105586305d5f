"""Host against device time of the eager forwards a burst of turns runs: the TTS prefill and whale.

In a 64-client burst on an H200 a TTS prefill call took 11 to 33 ms and a whale call for 32 turns
59 to 140 ms (benchmarks/README.md), far more than their arithmetic. This times each alone on an
idle device, with random weights at the full-size dims: how long the call takes to return to
Python (host), how long its kernels run (CUDA events, from before the call to after its last
kernel), how many torch operations and kernels it launches, and which operations cost the most host
time (torch profiler). Host close to device time and many small kernels: launch-bound, a case for
CUDA graphs; device time far above host time: the kernels themselves are slow.

    python -m benchmarks.eager_forwards --device cuda --json $OUT/eager_forwards.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.tts import load
from tts.batch import DecoderBatch, UtteranceText
from vita.whale import AudioEncoderConfig, WhaleAudioEncoder

EN_HELLO_FRAMES = 560  # fbank frames of a 5.6 s utterance
SENTENCE_ROWS = 48  # TTS embedding rows of a 12-token sentence


def timed(call: Callable[[], object], device: torch.device, repeats: int) -> dict:
    """Median host and device milliseconds of `call` over `repeats` runs (after two warm-up runs)."""
    host, kernels = [], []
    for run in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        began = time.perf_counter()
        call()
        returned = time.perf_counter() - began
        if device.type == "cuda":
            end.record()
            end.synchronize()
            spent = start.elapsed_time(end) / 1000
        else:
            spent = returned
        if run >= 2:
            host.append(returned * 1000)
            kernels.append(spent * 1000)
    return {"host_ms": statistics.median(host), "device_ms": statistics.median(kernels)}


def profiled(call: Callable[[], object], device: torch.device) -> dict:
    """Operations and kernels of one `call`, and the operations with the most host time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {
        "torch_ops": sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None),
        "kernels": sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
        "top_host_ops": [{"op": e.key, "calls": e.count, "self_host_ms": e.self_cpu_time_total / 1000} for e in top],
    }


def tts_prefill_cases(device: torch.device, repeats: int) -> list[dict]:
    synth = load("full", str(device))
    decoder = synth.decoder
    batch = DecoderBatch(decoder, slots=64, capacity=2048, cuda_graphs=False)
    dtype = decoder.embedding.weight.dtype
    results = []
    for sentences in (1, 4, 16):
        rows = [torch.randn(SENTENCE_ROWS, decoder.config.idim, device=device, dtype=dtype) for _ in range(sentences)]
        texts = [UtteranceText(text, 2, 100, None) for text in rows]

        def prefill() -> None:
            for stream in batch.add_many(texts):
                batch.remove(stream)

        results.append({"part": "tts_prefill", "items": sentences, "rows": SENTENCE_ROWS,
                        **timed(prefill, device, repeats), **profiled(prefill, device)})
    return results


def whale_cases(device: torch.device, repeats: int) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    encoder = WhaleAudioEncoder(AudioEncoderConfig.full()).to(device=device, dtype=dtype).eval()
    results = []
    for turns in (1, 32):
        feats = torch.randn(turns, EN_HELLO_FRAMES, encoder.config.input_dim, device=device)
        lengths = torch.full((turns,), EN_HELLO_FRAMES, device=device)

        @torch.inference_mode()
        def forward() -> None:
            encoder(feats, lengths)

        results.append({"part": "whale", "items": turns, "frames": EN_HELLO_FRAMES,
                        **timed(forward, device, repeats), **profiled(forward, device)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    results = tts_prefill_cases(device, args.repeats) + whale_cases(device, args.repeats)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"eager forwards alone on {machine}, torch {torch.__version__}, median of {args.repeats}")
    print(f"{'part':<12} {'items':>5} {'host ms':>8} {'device ms':>9} {'torch ops':>9} {'kernels':>7}  most host time")
    for r in results:
        top = ", ".join(f"{t['op']} {t['self_host_ms']:.2f}" for t in r["top_host_ops"][:3])
        print(f"{r['part']:<12} {r['items']:>5} {r['host_ms']:>8.2f} {r['device_ms']:>9.2f} {r['torch_ops']:>9} "
              f"{r['kernels']:>7}  {top}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"machine": machine, "torch": torch.__version__, "results": results}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
