"""TTS speed through `tts.service.SpeechService`: time to first segment (TTFS) and real-time factor (RTF).

N utterances are spoken at once into one service (its two threads: shared decoder steps, CUDA graphs
on CUDA; codec windows of all streams decoded together). Weights are random (tiny checkpoint, or the
plausible full-size shapes below) with eos disabled, so every utterance is exactly --tokens codec
codes (40 codes = 1 s). On CUDA the script first checks that the service (graphs, batched codec)
gives the segments of `Synthesizer.synthesize` (eager, one utterance) on a float32 tiny model.

    python -m benchmarks.tts --config tiny --device cpu --json out/tts_cpu.json
    python -m benchmarks.tts --config full --device cuda --streams 1 16 64 --json $OUT/tts_h200.json

TTFS = time from `speak` to the stream's first segment. RTF per stream = wall time (from the `speak`
calls to the last `on_done`) / audio seconds of one stream (< 1: every stream keeps up with playback).
x realtime = audio seconds of all streams / wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from tts.config import SAMPLE_RATE
from tts.service import SpeechService
from tts.synthesizer import PADDING, Synthesizer
from tts.tiny_checkpoint import (
    full_size_codec_config,
    full_size_decoder_config,
    write_random_tts_checkpoint,
    write_tiny_tts_checkpoint,
)

def load(config: str, device: str, dtype: torch.dtype | None = None) -> Synthesizer:
    with tempfile.TemporaryDirectory() as tmp:
        if config == "tiny":
            write_tiny_tts_checkpoint(Path(tmp))
        else:
            write_random_tts_checkpoint(Path(tmp), full_size_decoder_config(), full_size_codec_config())
        return Synthesizer.load(Path(tmp), device, dtype)


def speak_all(service: SpeechService, requests: list[dict]) -> tuple[float, list[float], list[list[np.ndarray]]]:
    """Speak every request (`speak` arguments) at once; wall time to the last on_done, and each
    utterance's TTFS and segments."""
    n = len(requests)
    first: list[float] = [0.0] * n
    segments: list[list[np.ndarray]] = [[] for _ in range(n)]
    done, errors, finished = [0], [], threading.Event()

    def callbacks(i: int) -> dict:
        def on_segment(segment: np.ndarray) -> None:  # callbacks all run in the TTS thread
            first[i] = first[i] or time.perf_counter() - start
            segments[i].append(segment)

        def on_done(error: BaseException | None) -> None:
            errors.extend([error] if error else [])
            done[0] += 1
            if done[0] == n:
                finished.set()

        return {"on_segment": on_segment, "on_done": on_done}

    start = time.perf_counter()
    for i, request in enumerate(requests):
        service.speak(**request, **callbacks(i))
    finished.wait()
    if errors:
        raise errors[0]
    return time.perf_counter() - start, first, segments


def run_streams(service: SpeechService, streams: int, *, tokens: int, chunk: int, rows: int, device: str) -> dict:
    requests = [{"embeddings": torch.randn(rows, service.synthesizer.embedding_dim, device=device),
                 "codec_chunk_size": chunk, "padding": PADDING, "max_tokens": tokens} for _ in range(streams)]
    wall, first, segments = speak_all(service, requests)
    audio = sum(len(s) for s in segments[0]) / SAMPLE_RATE
    return {
        "streams": streams, "chunk": chunk, "padding": PADDING, "codes": tokens, "audio_s_per_stream": audio,
        "ttfs_mean_s": sum(first) / streams, "ttfs_max_s": max(first), "wall_s": wall,
        "rtf_per_stream": wall / audio, "x_realtime_total": streams * audio / wall,
    }


def check_service(device: str, steps_per_call: int, prefill_graphs: bool) -> int:
    """Service (graphs, batched codec) against `synthesize` for 6 utterances on a float32 tiny model
    without TF32; returns the largest sample difference (a token drawn differently changes thousands)."""
    synth = load("tiny", device, torch.float32)
    requests = [{"embeddings": torch.randn(8 + 5 * i, synth.embedding_dim, generator=torch.Generator().manual_seed(i)),
                 "codec_chunk_size": 20, "max_tokens": 30 + 20 * i} for i in range(6)]
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        expected = [list(synth.synthesize(**r, generator=torch.Generator().manual_seed(i)))
                    for i, r in enumerate(requests)]
        service = SpeechService(synth, max_streams=4, capacity=256, steps_per_call=steps_per_call,  # two wait
                                prefill_graphs=prefill_graphs)
        service.start()
        seeded = [{**r, "generator": torch.Generator().manual_seed(i)} for i, r in enumerate(requests)]
        _, _, got = speak_all(service, seeded)
        service.close()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    lengths_differ = [len(s) for s in got] != [len(s) for s in expected]
    difference = max(int(np.abs(a.astype(np.int32) - b).max()) for g, e in zip(got, expected) for a, b in zip(g, e))
    if lengths_differ or difference > 16:
        raise AssertionError(f"the service gave other segments than synthesize (sample difference {difference})")
    return difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=120, help="codec codes per utterance (40 = 1 s)")
    parser.add_argument("--text-tokens", type=int, default=12, help="LLM tokens per sentence (x4 rows)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps-per-call", type=int, default=1, help="decoder steps per call")
    parser.add_argument("--prefill-graphs", action="store_true", help="CUDA: prefills from CUDA graphs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    check = check_service(args.device, args.steps_per_call, args.prefill_graphs) if args.device.startswith("cuda") else None
    synth = load(args.config, args.device)
    with torch.no_grad():
        synth.decoder.out_fnn.bias[synth.decoder.config.eos_id] = float("-inf")
    rows = 4 * args.text_tokens
    service = SpeechService(synth, max_streams=max(args.streams), steps_per_call=args.steps_per_call,
                            prefill_graphs=args.prefill_graphs)
    started = time.perf_counter()
    service.start()  # captures graphs, plans codec shapes
    warm_up_s = time.perf_counter() - started
    run_streams(service, max(args.streams), tokens=60, chunk=20, rows=rows, device=args.device)  # first calls
    results = [min((run_streams(service, n, tokens=args.tokens, chunk=chunk, rows=rows, device=args.device)
                    for _ in range(args.repeats)), key=lambda r: r["wall_s"])
               for chunk in (20, 40) for n in args.streams]
    service.close()
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"

    print(f"TTS service benchmark: config={args.config} device={args.device} ({machine}), decoder dtype="
          f"{synth.decoder.embedding.weight.dtype}, {rows} embedding rows, {args.tokens} codes, "
          f"{service.batch.steps_per_call} decoder steps per call, prefill graphs {args.prefill_graphs}, "
          f"best of {args.repeats}; "
          f"warm-up (graphs, codec plans) {warm_up_s:.1f} s"
          + (f"; service = synthesize check passed (max sample difference {check})" if check is not None else ""))
    print(f"{'streams':>7} {'chunk':>5} {'TTFS mean s':>11} {'TTFS max s':>10} {'wall s':>7} "
          f"{'RTF/stream':>10} {'x realtime':>10}")
    for r in results:
        print(f"{r['streams']:>7} {r['chunk']:>5} {r['ttfs_mean_s']:>11.3f} {r['ttfs_max_s']:>10.3f} "
              f"{r['wall_s']:>7.2f} {r['rtf_per_stream']:>10.3f} {r['x_realtime_total']:>10.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": args.config, "device": args.device, "machine": machine,
                                         "torch": torch.__version__, "rows": rows, "warm_up_s": warm_up_s,
                                         "steps_per_call": service.batch.steps_per_call,
                                         "check_max_sample_difference": check, "results": results}, indent=2))


if __name__ == "__main__":
    main()
