"""TTS speed: time to first segment (TTFS) and real-time factor (RTF), one stream and N streams.

N streams are N `Synthesizer.synthesize` generators interleaved round-robin on one thread, as the
server worker drives them. Weights are random (tiny checkpoint, or the plausible full-size shapes
below) with eos disabled, so every utterance is exactly --tokens codec codes (40 codes = 1 s).

    python -m benchmarks.tts --config tiny --device cpu --json out/tts_cpu.json
    python -m benchmarks.tts --config full --device cuda --json $OUT/tts_h100.json

RTF per stream = wall time / audio seconds of one stream (< 1: every stream keeps up with playback).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from tts.batch import DecoderBatch
from tts.config import SAMPLE_RATE, CodecConfig, DecoderConfig
from tts.synthesizer import PADDING, Synthesizer
from tts.tiny_checkpoint import write_random_tts_checkpoint, write_tiny_tts_checkpoint

# Plausible VITA-1.5 shapes (the real model.json files ship only with the weights): 896-wide decoder
# as the demos' reshape implies; 4 blocks, 14 heads, 4864 FFN (Qwen2-0.5B-like) and the TiCodec
# generator/quantizer below follow a public Freeze-Omni training re-implementation's configs.
FULL_DECODER = DecoderConfig(
    idim=896, odim=1024, transformer_attention_dim=896, transformer_linear_units=4864,
    transformer_attention_heads=14, transformer_num_blocks=4, encoder_output_dim=896,
)
FULL_CODEC = CodecConfig(
    upsample_rates=(8, 5, 5, 3), upsample_kernel_sizes=(16, 11, 11, 5), upsample_initial_channel=512,
    resblock="1", resblock_kernel_sizes=(3, 7, 11), resblock_dilation_sizes=((1, 3, 5),) * 3,
    n_codes=1024, n_code_groups=1, residul_layer=1, global_code_num=8,
    global_tokens=(473, 975, 419, 219, 565, 121, 550, 616),
)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_run(synth: Synthesizer, streams: int, repeats: int, **kwargs) -> dict:
    """The fastest of `repeats` runs: on a shared machine the others measure its other tenants."""
    return min((run_streams(synth, streams, **kwargs) for _ in range(repeats)), key=lambda r: r["wall_s"])


def run_streams(synth: Synthesizer, streams: int, *, tokens: int, chunk: int, rows: int, device: str) -> dict:
    """Interleave `streams` syntheses; TTFS per stream and the wall time of the whole batch."""
    inputs = [torch.randn(rows, synth.embedding_dim, device=device) for _ in range(streams)]
    sync(device)
    start = time.perf_counter()
    active = {i: synth.synthesize(x, codec_chunk_size=chunk, padding=PADDING, max_tokens=tokens)
              for i, x in enumerate(inputs)}
    first: dict[int, float] = {}
    samples = [0] * streams
    while active:
        for i, segments in list(active.items()):
            segment = next(segments, None)
            if segment is None:
                del active[i]
                continue
            first.setdefault(i, time.perf_counter() - start)
            samples[i] += len(segment)
    wall = time.perf_counter() - start
    audio = samples[0] / SAMPLE_RATE
    return {
        "streams": streams, "chunk": chunk, "padding": PADDING, "codes": tokens, "audio_s_per_stream": audio,
        "ttfs_mean_s": sum(first.values()) / streams, "ttfs_max_s": max(first.values()), "wall_s": wall,
        "rtf_per_stream": wall / audio, "x_realtime_total": streams * audio / wall,
    }


def component_speed(synth: Synthesizer, *, tokens: int, rows: int, device: str) -> dict:
    """Decoder codes/s alone, and codec speed on 40 + 2 * padding frames (one chunk window)."""
    x = torch.randn(rows, synth.embedding_dim, device=device)
    sync(device)
    start = time.perf_counter()
    codes = list(DecoderBatch(synth.decoder, slots=1).generate(x, max_tokens=tokens))
    decoder_s = time.perf_counter() - start
    window = torch.randint(0, synth.codec.config.n_codes, (1, 40 + 2 * PADDING), device=device)
    synth.codec.decode(window)
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        synth.codec.decode(window)
    sync(device)
    codec_s = (time.perf_counter() - start) / 5
    return {"decoder_codes_per_s": len(codes) / decoder_s,
            "codec_window_ms": 1000 * codec_s, "codec_x_realtime": window.shape[1] * 600 / SAMPLE_RATE / codec_s}


def codec_planning(synth: Synthesizer, *, device: str) -> dict:
    """Time `plan_codec_windows` (every window length chunk 40 can ask for, each decoded for the first
    time: on CUDA, cuDNN plans each new shape), then each length once more (planned)."""
    lengths = range(1, 40 + 2 * PADDING + 1)
    sync(device)
    start = time.perf_counter()
    synth.plan_codec_windows(40, PADDING)
    sync(device)
    plan_s = time.perf_counter() - start
    planned_ms = []
    for frames in lengths:
        start = time.perf_counter()
        synth.codec.decode(torch.zeros(1, frames, dtype=torch.long))
        sync(device)
        planned_ms.append(1000 * (time.perf_counter() - start))
    return {"windows": len(lengths), "plan_s": plan_s, "first_ms_mean": 1000 * plan_s / len(lengths),
            "planned_ms_mean": sum(planned_ms) / len(planned_ms), "planned_ms_max": max(planned_ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=120, help="codec codes per utterance (40 = 1 s)")
    parser.add_argument("--text-tokens", type=int, default=12, help="LLM tokens per sentence (x4 rows)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.config == "tiny":
            write_tiny_tts_checkpoint(Path(tmp))
        else:
            write_random_tts_checkpoint(Path(tmp), FULL_DECODER, FULL_CODEC)
        synth = Synthesizer.load(Path(tmp), args.device)
    with torch.no_grad():
        synth.decoder.out_fnn.bias[synth.decoder.config.eos_id] = float("-inf")
    rows = 4 * args.text_tokens
    planning = codec_planning(synth, device=args.device)  # before any other codec call
    run_streams(synth, 1, tokens=60, chunk=20, rows=rows, device=args.device)  # warm-up

    results = [best_run(synth, n, args.repeats, tokens=args.tokens, chunk=chunk, rows=rows, device=args.device)
               for chunk in (20, 40) for n in args.streams]
    components = component_speed(synth, tokens=args.tokens, rows=rows, device=args.device)
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"

    print(f"TTS benchmark: config={args.config} device={args.device} ({machine}), "
          f"decoder dtype={synth.decoder.embedding.weight.dtype}, {rows} embedding rows, {args.tokens} codes, "
          f"best of {args.repeats}")
    print(f"{'streams':>7} {'chunk':>5} {'TTFS mean s':>11} {'TTFS max s':>10} {'wall s':>7} "
          f"{'RTF/stream':>10} {'x realtime':>10}")
    for r in results:
        print(f"{r['streams']:>7} {r['chunk']:>5} {r['ttfs_mean_s']:>11.3f} {r['ttfs_max_s']:>10.3f} "
              f"{r['wall_s']:>7.2f} {r['rtf_per_stream']:>10.3f} {r['x_realtime_total']:>10.1f}")
    print(f"decoder {components['decoder_codes_per_s']:.0f} codes/s (40 = real time); codec "
          f"{components['codec_window_ms']:.1f} ms per {40 + 2 * PADDING}-frame window "
          f"({components['codec_x_realtime']:.0f}x real time)")
    print(f"plan_codec_windows: {planning['windows']} window lengths in {planning['plan_s']:.2f} s "
          f"({planning['first_ms_mean']:.1f} ms each, first decode); planned, a window takes "
          f"{planning['planned_ms_mean']:.1f} ms mean, {planning['planned_ms_max']:.1f} ms max")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": args.config, "device": args.device, "machine": machine,
                                         "torch": torch.__version__, "rows": rows, "results": results,
                                         "components": components, "codec_planning": planning}, indent=2))


if __name__ == "__main__":
    main()
