"""One decode forward (ids -> logits) replayed from a CUDA graph, per model variant.

Variants, applied in turn to one model at full VITA-1.5 LLM dims with random bf16 weights:
``unfused`` (separate q/k/v and gate/up products, eager elementwise steps), ``fused``
(``prepare_for_inference``), ``fast kernels`` (compiled elementwise steps, Triton one-token attention) and
``whole`` (the fused step entirely through torch.compile(mode="max-autotune-no-cudagraphs"),
minutes of compiling); ``--variants`` picks them.
Prints ms per forward at each batch size (attended-length bucket ``--kv-len``) and the kernel
table of one profiled eager batch-1 forward per variant; writes JSON. Needs CUDA.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/decode_step.py --out step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend
from torch.profiler import ProfilerActivity, profile

from benchmarks.decode import build_model
from layers import attention as sdpa
from layers.kv_cache import KVCache
from vita.qwen2 import LLMConfig, new_kv_cache

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def step_inputs(batch: int, kv_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, positions ``[B, 1]`` near the end of the bucket, and distinct slots."""
    ids = torch.randint(0, 1000, (batch,), device=device)
    positions = torch.full((batch, 1), kv_len - 100, device=device)
    return ids, positions, torch.arange(batch, device=device)


def graph_ms(step: Step, batch: int, kv_len: int, device: torch.device, replays: int = 200) -> float:
    """Mean time of ``replays`` graph replays after warm-up, timed with CUDA events."""
    ids, positions, slots = step_inputs(batch, kv_len, device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step(ids, positions, slots, kv_len)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(ids, positions, slots, kv_len)
    for _ in range(20):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    del graph
    return start.elapsed_time(end) / replays


def kernel_table(step: Step, kv_len: int, device: torch.device) -> tuple[str, float, int, torch.Tensor]:
    """Profiler table of one eager batch-1 forward, the summed kernel time (ms), kernel count and logits."""
    ids, positions, slots = step_inputs(1, kv_len, device)
    for _ in range(3):
        logits = step(ids, positions, slots, kv_len)
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(ids, positions, slots, kv_len)
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_ms = sum(e.device_time_total for e in kernels) / 1000
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    return table, total_ms, len(kernels), logits.float()


def prefill_chunk_ms(core, cache: KVCache, start: int, length: int, device: torch.device) -> tuple[float, float]:
    """One eager prefill chunk of ``length`` tokens after ``start`` cached ones: the first call at
    this shape, then the median of 5 more (ms)."""
    embeds = torch.randn(1, length, core.config.hidden_size, device=device, dtype=torch.bfloat16)
    positions = torch.arange(start, start + length, device=device)[None]
    slots = torch.tensor([0], device=device)
    kv_len = 1 << (start + length - 1).bit_length()
    times = []
    for _ in range(6):
        torch.cuda.synchronize(device)
        began = time.perf_counter()
        core(embeds, positions, cache, slots, max(kv_len, 256))
        torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - began))
    return times[0], statistics.median(times[1:])


def prefill_table(core, cache: KVCache, device: torch.device) -> dict:
    """Chunked prefill of a 600-token prompt (256 + 256 + 88) with and without cuDNN attention,
    each at prompt lengths not seen before (cuDNN plans are cached per shape)."""
    backends = {"with cuDNN": [SDPBackend.CUDNN_ATTENTION, *sdpa.BACKENDS], "without cuDNN": None}
    results = {}
    for offset, (name, chosen) in enumerate(backends.items()):
        kept = sdpa.BACKENDS
        sdpa.BACKENDS = chosen or kept
        try:
            chunks = [(0, 256 - offset), (256, 256 - offset), (512, 88 - offset)]
            results[name] = {f"{start}+{length}": prefill_chunk_ms(core, cache, start, length, device)
                             for start, length in chunks}
        finally:
            sdpa.BACKENDS = kept
        print(f"== prefill chunks {name}: (first call ms, median of next 5 ms) {results[name]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="decode_step.json")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--kv-len", type=int, default=1024)
    parser.add_argument("--prefill", action="store_true", help="also time eager prefill chunks per SDPA backend set")
    parser.add_argument("--variants", nargs="+", default=["unfused", "fused", "fast kernels"],
                        choices=["unfused", "fused", "fast kernels", "whole"])
    args = parser.parse_args()

    device = torch.device("cuda")
    config = LLMConfig.full()
    core, lm_head = build_model(config, device, torch.bfloat16)
    cache = new_kv_cache(config, max(args.batches), args.kv_len, device, torch.bfloat16)

    def step(ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_len: int) -> torch.Tensor:
        return lm_head(core(core.embed_tokens(ids)[:, None], positions, cache, slots, kv_len)[:, 0])

    makers: dict[str, Callable[[], Step]] = {
        "unfused": lambda: step,
        "fused": lambda: (core.prepare_for_inference(), step)[1],
        "fast kernels": lambda: (core.prepare_for_inference(use_fast_kernels=True), step)[1],
        "whole": lambda: (core.prepare_for_inference(), torch.compile(step, mode="max-autotune-no-cudagraphs"))[1],
    }
    variants = {name: makers[name] for name in args.variants}
    results = {"machine": torch.cuda.get_device_name(device), "torch": torch.__version__, "kv_len": args.kv_len}
    first_logits = None
    with torch.inference_mode():
        for name, make in variants.items():
            variant_step = make()
            torch.manual_seed(0)  # the same step inputs for every variant
            table, kernel_ms, kernels, logits = kernel_table(variant_step, args.kv_len, device)
            first_logits = logits if first_logits is None else first_logits
            error = ((logits - first_logits).norm() / first_logits.norm()).item()
            print(f"== {name}: {kernels} kernels, {kernel_ms:.2f} ms of kernel time per eager batch-1 forward, "
                  f"logits relative difference to the first variant {error:.2e}\n{table}")
            ms = {b: graph_ms(variant_step, b, args.kv_len, device) for b in args.batches}
            results[name] = {"kernels": kernels, "kernel_ms": kernel_ms, "graph_ms": ms, "logits_rel_diff": error}
            print(f"== {name}: graph replay ms per forward {ms}", flush=True)
            with open(args.out, "w") as file:
                json.dump(results, file, indent=2)
        if args.prefill:
            results["prefill_chunks_ms"] = prefill_table(core, cache, device)
            with open(args.out, "w") as file:
                json.dump(results, file, indent=2)
    print(f"\n{results['machine']}, torch {results['torch']}, attended-length bucket {args.kv_len}")
    print("| variant | kernels (b1) | kernel time b1 | " + " | ".join(f"graph b{b}" for b in args.batches)
          + " | logits vs first |")
    print("|---|---:|---:|" + "---:|" * len(args.batches) + "---:|")
    for name in variants:
        r = results[name]
        cells = " | ".join(f"{r['graph_ms'][b]:.2f} ms" for b in args.batches)
        print(f"| {name} | {r['kernels']} | {r['kernel_ms']:.2f} ms | {cells} | {r['logits_rel_diff']:.1e} |")


if __name__ == "__main__":
    main()
