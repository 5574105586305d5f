"""Decode benchmark: the engine at full VITA-1.5 LLM dims (random bf16 weights) vs transformers' generate.

Measures ms/token at several batch sizes, idle prefill latency, time to first token while other
sessions decode (one long prompt; turns arriving one by one), peak GPU memory, and Qwen2ForCausalLM.generate on the same weights. Prints a
table and writes JSON. ``--tiny`` runs the same code on small dims (smoke test, CPU is fine).

    PYTHONUNBUFFERED=1 python -m benchmarks.decode --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from dataclasses import asdict, replace

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from vita.engine import Engine
from vita.qwen2 import LLMConfig, Qwen2Model
from vita.sampling import SamplingParams


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(config: LLMConfig, device: torch.device, dtype: torch.dtype) -> tuple[Qwen2Model, torch.nn.Linear]:
    """Random weights (std 0.02, norms 1) straight on the device; buffers (RoPE's inv_freq, made on
    the CPU) moved there in float32, as the checkpoint loader leaves them."""
    with torch.device(device):
        core = Qwen2Model(config).to(device).eval()
        lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False).to(dtype)
    with torch.no_grad():
        for param in core.parameters():
            param.data = param.data.to(dtype)
        for name, param in list(core.named_parameters()) + [("lm_head", lm_head.weight)]:
            if "norm" not in name:
                param.normal_(0, 0.02)
    return core, lm_head


def hf_sharing_weights(core: Qwen2Model, lm_head: torch.nn.Linear, device: torch.device) -> Qwen2ForCausalLM:
    """transformers' Qwen2ForCausalLM holding the very same weight tensors (no second copy)."""
    c = core.config
    hf_config = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(hf_config)
    state = {f"model.{name}": tensor for name, tensor in core.state_dict().items()}
    state["lm_head.weight"] = lm_head.weight
    hf.load_state_dict(state, assign=True, strict=True)
    with torch.device(device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config)
    return hf.eval()


def random_prompt(core: Qwen2Model, length: int, seed: int) -> torch.Tensor:
    device = core.embed_tokens.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    ids = torch.randint(0, core.config.vocab_size, (length,), generator=generator, device=device)
    with torch.inference_mode():
        return core.embed_tokens(ids)


async def stream_times(
    engine: Engine, session_id: str, embeds: torch.Tensor, max_tokens: int, times: list[float] | None = None
) -> list[float]:
    """Arrival time of every token of one turn (appended to ``times`` as they come)."""
    times = [] if times is None else times
    async for _ in engine.generate(session_id, embeds, SamplingParams(max_tokens=max_tokens)):
        times.append(time.perf_counter())
    return times


async def decode_ms_per_step(engine: Engine, core: Qwen2Model, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Steady-state step time with ``batch`` sessions decoding together (window where all are active)."""
    prompts = [random_prompt(core, prompt_len, seed=i) for i in range(batch)]
    ramp_steps = -(-batch * (prompt_len + 1) // engine.prefill_chunk)  # chunked prefill of all prompts
    max_tokens = new_tokens + ramp_steps + 2
    runs = await asyncio.gather(*(stream_times(engine, f"d{i}", p, max_tokens) for i, p in enumerate(prompts)))
    for i in range(batch):
        engine.end_session(f"d{i}")
    start = max(times[0] for times in runs)
    end = min(times[-1] for times in runs)
    steps = statistics.median(sum(start < t <= end for t in times) for times in runs)
    return 1000 * (end - start) / steps


async def first_token_ms(engine: Engine, core: Qwen2Model, prompt_len: int, session_id: str) -> float:
    prompt = random_prompt(core, prompt_len, seed=99)
    start = time.perf_counter()
    times = await stream_times(engine, session_id, prompt, max_tokens=1)
    engine.end_session(session_id)
    return 1000 * (times[0] - start)


async def background_decoding(engine: Engine, core: Qwen2Model, others: int, seed: int) -> tuple[list, list[list[float]]]:
    """``others`` sessions decoding long replies, returned once every one of them streams: their
    tasks and the arrival times of their tokens (growing)."""
    prompts = [random_prompt(core, 512, seed=seed + i) for i in range(others)]
    runs: list[list[float]] = [[] for _ in range(others)]
    tasks = [
        asyncio.ensure_future(stream_times(engine, f"bg{i}", p, 1000, times))
        for i, (p, times) in enumerate(zip(prompts, runs))
    ]
    while not all(runs):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    return tasks, runs


async def stop_background(engine: Engine, tasks: list, runs: list[list[float]], before: float, after: float) -> dict:
    """End the background sessions; their token gaps between ``before`` and ``after`` (p50, max) and
    the median gap in the 0.2 s before, in ms."""
    for i in range(len(tasks)):
        engine.cancel(f"bg{i}")
    await asyncio.gather(*tasks)
    for i in range(len(tasks)):
        engine.end_session(f"bg{i}")
    gaps = sorted(b - a for times in runs for a, b in zip(times, times[1:]) if before <= a and b <= after)
    steady = [b - a for times in runs for a, b in zip(times, times[1:]) if before - 0.2 <= a and b < before]
    nan = float("nan")
    return {
        "others_gap_ms_p50": 1000 * statistics.median(gaps) if gaps else nan,
        "others_max_gap_ms": 1000 * gaps[-1] if gaps else nan,
        "others_median_gap_before_ms": 1000 * statistics.median(steady) if steady else nan,
    }


async def first_token_under_load(engine: Engine, core: Qwen2Model, others: int, prompt_len: int) -> dict:
    """Time to first token of a new session while ``others`` sessions keep decoding."""
    tasks, runs = await background_decoding(engine, core, others, seed=200)
    before = time.perf_counter()
    ttft = await first_token_ms(engine, core, prompt_len, "newcomer")
    after = time.perf_counter()
    return {"ttft_ms": ttft, **await stop_background(engine, tasks, runs, before, after)}


async def arrivals_under_load(
    engine: Engine, core: Qwen2Model, others: int, arrivals: int, prompt_len: int, spacing_s: float
) -> dict:
    """Turns arriving one by one (``spacing_s`` apart, as spread ends of users' turns do) while
    ``others`` sessions keep decoding: each arrival's time to first token, and the decoding
    sessions' token gaps meanwhile. The engine alone: no encoders, no TTS, no server."""
    tasks, runs = await background_decoding(engine, core, others, seed=300)

    async def arrival(index: int) -> float:
        await asyncio.sleep(index * spacing_s)
        return await first_token_ms(engine, core, prompt_len, f"arrival{index}")

    before = time.perf_counter()
    ttfts = await asyncio.gather(*(arrival(i) for i in range(arrivals)))
    after = time.perf_counter()
    return {"arrival_ttft_ms_p50": statistics.median(ttfts), "arrival_ttft_ms_max": max(ttfts),
            **await stop_background(engine, tasks, runs, before, after)}


def hf_generate_ms_per_token(hf: Qwen2ForCausalLM, batch: int, prompt_len: int, new_tokens: int) -> float:
    """(time for new_tokens - time for 1) / (new_tokens - 1), greedy, no early stop."""
    device = hf.lm_head.weight.device
    ids = torch.randint(0, hf.config.vocab_size, (batch, prompt_len), device=device)

    def timed(count: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
                do_sample=False, pad_token_id=0, eos_token_id=None,
            )
        synchronize(device)
        return time.perf_counter() - start

    timed(2)  # warm-up
    return 1000 * (timed(new_tokens) - timed(1)) / (new_tokens - 1)


def check_against_reference(device: torch.device) -> bool:
    """Tiny fp32 model: engine (CUDA graphs on CUDA) greedy == no-cache greedy, 4 concurrent sessions."""
    torch.manual_seed(0)
    core, lm_head = build_model(LLMConfig.tiny(vocab_size=300), device, torch.float32)
    with torch.no_grad():
        for param in list(core.parameters()) + [lm_head.weight]:
            if param.ndim > 1:
                param.normal_(0, 0.2)
    engine = Engine(core, lm_head, max_sessions=6, max_len=128, device=device, dtype=torch.float32,
                    stop_token_ids=(), prefill_chunk=8)
    prompts = [random_prompt(core, n, seed=n) for n in (3, 11, 20, 37, 5)]

    async def run() -> list[list[int]]:
        async def one(i: int, p: torch.Tensor) -> list[int]:
            return [t async for t in engine.generate(f"s{i}", p, SamplingParams(max_tokens=12))]

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    results = asyncio.run(run())
    with torch.inference_mode():
        for embeds, tokens in zip(prompts, results):
            expected = []
            for _ in range(12):
                expected.append(int(lm_head(core.forward_reference(embeds[None])[0, -1]).argmax()))
                embeds = torch.cat([embeds, core.embed_tokens(torch.tensor(expected[-1:], device=device))])
            if expected != tokens:
                return False
    return True


async def engine_measurements(engine: Engine, core: Qwen2Model, args) -> dict:
    results = {"decode_ms_per_token": {}, "decode_tokens_per_s": {}}
    await first_token_ms(engine, core, 64, "warmup")
    for batch in args.batches:
        ms = await decode_ms_per_step(engine, core, batch, args.prompt_len, args.new_tokens)
        results["decode_ms_per_token"][batch] = ms
        results["decode_tokens_per_s"][batch] = 1000 * batch / ms
        print(f"batch {batch}: {ms:.2f} ms/step, {1000 * batch / ms:.0f} tok/s", flush=True)
    results["prefill_600_ttft_ms"] = statistics.median(
        [await first_token_ms(engine, core, 600, f"p{i}") for i in range(3)]
    )
    results["under_load"] = await first_token_under_load(engine, core, 31, 600)
    print(f"prefill/ttft: {results['prefill_600_ttft_ms']:.1f} ms, under load {results['under_load']}", flush=True)
    results["arrivals"] = await arrivals_under_load(
        engine, core, args.arrival_others, args.arrivals, args.arrival_prompt_len, args.arrival_spacing_ms / 1000
    )
    print(f"spread arrivals: {results['arrivals']}", flush=True)
    return results


def profile_decode_step(engine: Engine, core: Qwen2Model, path: str) -> None:
    """Kernel table of one eager (no graph) batch-1 decode forward at a 1024-token bucket."""
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    inputs = (torch.tensor([1], device=engine.device), torch.tensor([[600]], device=engine.device),
              runner.cache, torch.tensor([0], device=engine.device), 1024)
    with torch.inference_mode():
        for _ in range(3):
            runner.lm_head(core(core.embed_tokens(inputs[0])[:, None], *inputs[1:]))
        synchronize(engine.device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runner.lm_head(core(core.embed_tokens(inputs[0])[:, None], *inputs[1:]))
            synchronize(engine.device)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    with open(path, "w") as file:
        file.write(table)
    print(table[-6000:], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="decode_results.json")
    parser.add_argument("--tiny", action="store_true", help="small dims (smoke test)")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--hf-batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--profile", help="write a kernel profile of one eager batch-1 decode step here")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--arrivals", type=int, default=16, help="turns arriving one by one while others decode")
    parser.add_argument("--arrival-others", type=int, default=48, help="sessions decoding meanwhile")
    parser.add_argument("--arrival-prompt-len", type=int, default=150, help="an arriving turn's tokens (a spoken turn)")
    parser.add_argument("--arrival-spacing-ms", type=float, default=30.0)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LLMConfig.tiny(vocab_size=1000) if args.tiny else LLMConfig.full()
    if args.layers:
        config = replace(config, num_hidden_layers=args.layers)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    results = {"machine": machine, "torch": torch.__version__, "config": asdict(config), "dtype": str(dtype)}
    results["check_engine_equals_reference"] = check_against_reference(device)
    print(f"{machine}: engine == no-cache reference: {results['check_engine_equals_reference']}", flush=True)

    core, lm_head = build_model(config, device, dtype)
    max_sessions = max(args.batches + [32, args.arrival_others + args.arrivals])  # the load measurements' sessions
    engine = Engine(core, lm_head, max_sessions=max_sessions, max_len=args.max_len, device=device,
                    dtype=dtype, stop_token_ids=())
    if engine.use_graphs:
        start = time.perf_counter()
        engine.capture_graphs()
        results["graph_capture_s"] = time.perf_counter() - start
        print(f"captured decode graphs in {results['graph_capture_s']:.1f} s", flush=True)
    if args.profile:
        profile_decode_step(engine, core, args.profile)
    results |= asyncio.run(engine_measurements(engine, core, args))
    if device.type == "cuda":
        results["engine_peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del engine

    hf = hf_sharing_weights(core, lm_head, device)
    results["hf_generate_ms_per_token"] = {
        b: hf_generate_ms_per_token(hf, b, args.prompt_len, args.new_tokens) for b in args.hf_batches
    }

    print(f"\n{machine}, torch {torch.__version__}, {dtype}, layers {config.num_hidden_layers}")
    print("| measurement | value |\n|---|---|")
    for batch in args.batches:
        print(f"| engine decode, batch {batch} | {results['decode_ms_per_token'][batch]:.2f} ms/token, "
              f"{results['decode_tokens_per_s'][batch]:.0f} tok/s total |")
    print(f"| engine prefill 600 tokens (idle, time to first token) | {results['prefill_600_ttft_ms']:.1f} ms |")
    load = results["under_load"]
    print(f"| time to first token, 600-token prompt, 31 others decoding | {load['ttft_ms']:.1f} ms |")
    print(f"| others' longest token gap meanwhile (median before) | {load['others_max_gap_ms']:.1f} ms "
          f"({load['others_median_gap_before_ms']:.1f} ms) |")
    arrivals = results["arrivals"]
    print(f"| {args.arrivals} turns of {args.arrival_prompt_len} tokens arriving {args.arrival_spacing_ms:g} ms apart, "
          f"{args.arrival_others} others decoding: first token p50 / max | {arrivals['arrival_ttft_ms_p50']:.1f} / "
          f"{arrivals['arrival_ttft_ms_max']:.1f} ms |")
    print(f"| others' token gaps meanwhile p50 / max (median before) | {arrivals['others_gap_ms_p50']:.1f} / "
          f"{arrivals['others_max_gap_ms']:.1f} ms ({arrivals['others_median_gap_before_ms']:.1f} ms) |")
    if "engine_peak_gpu_memory_gib" in results:
        print(f"| engine peak GPU memory (weights + KV {max_sessions + 2} slots x {args.max_len}) "
              f"| {results['engine_peak_gpu_memory_gib']:.1f} GiB |")
    for batch, ms in results["hf_generate_ms_per_token"].items():
        print(f"| transformers generate, batch {batch} | {ms:.2f} ms/token, {1000 * batch / ms:.0f} tok/s total |")
    with open(args.out, "w") as file:
        json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
