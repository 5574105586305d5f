"""`vita-make-tiny-checkpoint DIR`: a deterministic random VITA-1.5 checkpoint, tiny or full size.

Same folder layout and tensor names as the real checkpoint, seeded random weights and a real
byte-level BPE tokenizer (`vita.random_tokenizer`); the replies of a model loaded from it are
noise. `--size tiny` (the server's embedded default) is small and byte-identical on rewrite.
`--size full` has VITA-1.5's real dims (8.3 B numbers: bf16 LLM and vision, fp32 whale, as the
vLLM port's config says), the TTS at the full-size dims `tts.tiny_checkpoint` guesses, and a
151,646-id tokenizer; it is generated on `--device` (a GPU takes about a minute) for benchmarks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from tts.config import TTS_DIR
from tts.tiny_checkpoint import write_full_size_tts_checkpoint, write_tiny_tts_checkpoint
from vita.checkpoint import INDEX_FILE, build_on_meta
from vita.config import AUDIO_ENCODER_DIR, VISION_TOWER_DIR, VitaConfig
from vita.random_tokenizer import build_full_size_tokenizer, build_tiny_tokenizer, write_tokenizer
from vita.tokenizer import END_OF_TEXT, IM_END
from vita.whale import write_global_cmvn

SEED = 0
NUM_SHARDS = {"tiny": 2, "full": 4}
TINY_CHECKPOINT_VERSION = 1
# config.json names the component folders by absolute paths of a training machine, as upstream does.
UPSTREAM_WEIGHTS_ROOT = "/path/to/model_weights"
AUDIO_ENCODER_PREFIX = "model.audio_encoder."


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def random_state_dict(
    config: VitaConfig,
    generator: torch.Generator,
    dtype_of: Callable[[str], torch.dtype] = lambda name: torch.float32,
) -> dict[str, torch.Tensor]:
    """Seeded random values for every tensor of the model, in state_dict order, drawn on the
    generator's device and stored as `dtype_of(name)`.

    Matrices are scaled by 1/sqrt(fan-in), norm gains and layer scales sit around 1, CMVN
    statistics look like log-mel ones (mean ~12, istd ~0.3).
    """
    state = {}
    for name, tensor in build_on_meta(config).state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator, device=generator.device)
        if name.endswith("global_cmvn.mean"):
            value = 12.0 + 2.0 * noise
        elif name.endswith("global_cmvn.istd"):
            value = 0.3 + 0.05 * noise.clamp(-2, 2)
        elif tensor.dim() == 1 and name.endswith(("weight", "ls1", "ls2")):
            value = 1.0 + 0.1 * noise
        elif tensor.dim() == 1:
            value = 0.1 * noise
        else:
            value = noise / tensor[0].numel() ** 0.5
        state[name] = value.to(dtype_of(name)).contiguous()
    return state


def full_size_dtype(name: str) -> torch.dtype:
    """Stored precision of a full-size tensor: fp32 for whale (encoder and adapter), bf16 for the rest."""
    return torch.float32 if name.startswith(AUDIO_ENCODER_PREFIX) else torch.bfloat16


def write_shards(out_dir: Path, state: dict[str, torch.Tensor], num_shards: int) -> None:
    """`model-0000k-of-0000n.safetensors` (consecutive tensors, balanced by size) + the index.
    Tensors on an accelerator are copied to host memory one shard at a time."""
    total_bytes = sum(t.numel() * t.element_size() for t in state.values())
    shard_of = {}
    written = 0
    for name, tensor in state.items():
        shard_of[name] = min(num_shards - 1, written * num_shards // total_bytes)
        written += tensor.numel() * tensor.element_size()
    file_names = [f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors" for k in range(num_shards)]
    for k, file_name in enumerate(file_names):
        tensors = {name: tensor.cpu() for name, tensor in state.items() if shard_of[name] == k}
        save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        del tensors
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": {name: file_names[shard_of[name]] for name in sorted(state)},
    }
    _write_json(out_dir / INDEX_FILE, index)


def write_audio_encoder_dir(folder: Path, config: VitaConfig, state: dict[str, torch.Tensor]) -> None:
    """train.yaml, global_cmvn and final.pt (the encoder's own state_dict, superseded by the shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    config.audio.to_train_yaml(folder / "train.yaml")
    prefix = AUDIO_ENCODER_PREFIX
    encoder_state = {name[len(prefix):]: t.cpu() for name, t in state.items() if name.startswith(prefix)}
    write_global_cmvn(folder / "global_cmvn", encoder_state["encoder.global_cmvn.mean"],
                      encoder_state["encoder.global_cmvn.istd"])
    torch.save(encoder_state, folder / "final.pt")


def write_random_checkpoint(
    out_dir: Path,
    config: VitaConfig,
    state: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    num_shards: int,
) -> Path:
    """Write the checkpoint folder (all but the TTS) for `state`; returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer.get_vocab_size() > config.llm.vocab_size:
        raise ValueError("the tokenizer is larger than the LLM vocabulary")
    write_tokenizer(out_dir, tokenizer)
    config_json = config.to_config_json(
        vision_tower=f"{UPSTREAM_WEIGHTS_ROOT}/{VISION_TOWER_DIR}",
        audio_encoder=f"{UPSTREAM_WEIGHTS_ROOT}/{AUDIO_ENCODER_DIR}",
    )
    _write_json(out_dir / "config.json", config_json)
    _write_json(out_dir / "generation_config.json", {
        "eos_token_id": tokenizer.token_to_id(IM_END),
        "pad_token_id": tokenizer.token_to_id(END_OF_TEXT),
    })
    write_shards(out_dir, state, num_shards)
    write_audio_encoder_dir(out_dir / AUDIO_ENCODER_DIR, config, state)
    (out_dir / VISION_TOWER_DIR).mkdir(exist_ok=True)
    config.vision.to_json(out_dir / VISION_TOWER_DIR / "config.json")
    return out_dir


def write_tiny_checkpoint(out_dir: Path, seed: int = SEED) -> Path:
    """Write the whole tiny checkpoint folder (float32, drawn on the CPU); returns it."""
    config = VitaConfig.tiny()
    state = random_state_dict(config, torch.Generator().manual_seed(seed))
    out_dir = write_random_checkpoint(out_dir, config, state, build_tiny_tokenizer(), NUM_SHARDS["tiny"])
    write_tiny_tts_checkpoint(out_dir / TTS_DIR, llm_hidden=config.llm.hidden_size, seed=seed)
    return out_dir


def write_full_size_checkpoint(
    out_dir: Path, seed: int = SEED, device: str | torch.device = "cpu", config: VitaConfig | None = None
) -> Path:
    """Write a random checkpoint with VITA-1.5's real dims (or `config`'s), drawn on `device`; returns it."""
    config = config or VitaConfig.full()
    state = random_state_dict(config, torch.Generator(device).manual_seed(seed), full_size_dtype)
    out_dir = write_random_checkpoint(out_dir, config, state, build_full_size_tokenizer(seed), NUM_SHARDS["full"])
    del state
    write_full_size_tts_checkpoint(out_dir / TTS_DIR, seed=seed)
    return out_dir


def ensure_tiny_checkpoint(cache_dir: Path) -> Path:
    """The tiny checkpoint under `cache_dir`, written on first use (atomically: folder rename)."""
    cache_dir = Path(cache_dir)
    target = cache_dir / f"vita_tiny_ckpt_v{TINY_CHECKPOINT_VERSION}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".vita_tiny_", dir=cache_dir))
    try:
        write_tiny_checkpoint(staging)
        staging.rename(target)
    except OSError:
        if not target.is_dir():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu", help="where the full-size weights are drawn (cuda is fastest)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    if args.size == "tiny":
        path = write_tiny_checkpoint(args.dir, seed=args.seed)
    else:
        path = write_full_size_checkpoint(args.dir, seed=args.seed, device=args.device)
    print(f"{args.size} random VITA-1.5 checkpoint written to {path} (its replies are noise)")


if __name__ == "__main__":
    main()
