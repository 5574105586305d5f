"""Load a VITA-1.5 checkpoint folder into `VitaQwen2ForCausalLM`.

The model is built with its parameters on the meta device, then every tensor listed in the
safetensors index is read from its memory-mapped shard and moved to the target device and
dtype one at a time, so host RAM never holds a second copy of the model. Names and shapes
are checked strictly before anything is copied. Whale's global CMVN statistics stay float32
(`FLOAT32_TENSORS`): CMVN is applied in float32, and bf16 would round the means near 13 by up
to 0.03.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from vita.config import VitaConfig
from vita.model import VitaQwen2ForCausalLM

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_SHARD_FILE = "model.safetensors"
EMBED_KEY = "model.embed_tokens.weight"
FLOAT32_TENSORS = "*global_cmvn.*"  # loaded in float32 whatever the model dtype


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor at fault."""


def read_weight_map(checkpoint_dir: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index (or a single `model.safetensors`)."""
    checkpoint_dir = Path(checkpoint_dir)
    index_path = checkpoint_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{index_path}: not a safetensors index ({error})") from error
    elif (checkpoint_dir / SINGLE_SHARD_FILE).is_file():
        with _open_shard(checkpoint_dir / SINGLE_SHARD_FILE) as shard:
            weight_map = {name: SINGLE_SHARD_FILE for name in shard.keys()}
    else:
        raise CheckpointError(f"{checkpoint_dir}: neither {INDEX_FILE} nor {SINGLE_SHARD_FILE} found")
    for name, shard_name in weight_map.items():
        if not (checkpoint_dir / shard_name).is_file():
            raise CheckpointError(f"missing shard file {checkpoint_dir / shard_name} (holds tensor {name})")
    return weight_map


@contextlib.contextmanager
def _open_shard(path: Path) -> Iterator:
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"cannot read safetensors shard {path}: {error}") from error
    with handle as shard:
        yield shard


def read_stored_shapes(checkpoint_dir: Path, weight_map: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Shapes of all tensors, read from the shard headers; checks shards agree with the index."""
    shapes: dict[str, tuple[int, ...]] = {}
    for shard_name in sorted(set(weight_map.values())):
        with _open_shard(Path(checkpoint_dir) / shard_name) as shard:
            for name in shard.keys():
                if weight_map.get(name) != shard_name:
                    raise CheckpointError(
                        f"tensor {name} is in shard {shard_name} but the index maps it to {weight_map.get(name)}"
                    )
                shapes[name] = tuple(shard.get_slice(name).get_shape())
    for name, shard_name in weight_map.items():
        if name not in shapes:
            raise CheckpointError(f"tensor {name} is listed in the index but missing from shard {shard_name}")
    return shapes


def check_names_and_shapes(expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]]) -> None:
    """Raise naming the first missing, unexpected or mis-shaped tensor."""
    missing = [name for name in expected if name not in stored]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s), first: {missing[0]}")
    unexpected = [name for name in stored if name not in expected]
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s), first: {unexpected[0]}")
    for name, shape in expected.items():
        if stored[name] != shape:
            raise CheckpointError(f"tensor {name} has shape {list(stored[name])}, the model expects {list(shape)}")


def build_on_meta(config: VitaConfig) -> VitaQwen2ForCausalLM:
    """The model on the meta device (costs no memory, knows every name and shape); only buffers
    computed rather than loaded (RoPE's `inv_freq`) are made on the CPU."""
    with torch.device("meta"):
        return VitaQwen2ForCausalLM(config)


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every state_dict entry, in state_dict order."""
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def load_tensors(
    model: nn.Module,
    checkpoint_dir: Path,
    weight_map: dict[str, str],
    device: torch.device | str,
    dtype: torch.dtype,
    progress: bool = True,
) -> None:
    """Copy every tensor of the index into `model`, one at a time (floating ones cast to `dtype`,
    but `FLOAT32_TENSORS` to float32)."""
    by_shard: dict[str, list[str]] = {}
    for name, shard_name in weight_map.items():
        by_shard.setdefault(shard_name, []).append(name)
    with tqdm(total=len(weight_map), desc="loading VITA tensors", unit="tensor", disable=not progress) as bar:
        for shard_name in sorted(by_shard):
            with _open_shard(Path(checkpoint_dir) / shard_name) as shard:
                for name in by_shard[shard_name]:
                    tensor = shard.get_tensor(name)
                    target_dtype = load_dtype(name, tensor, dtype)
                    _assign(model, name, tensor.to(device=device, dtype=target_dtype))
                    del tensor
                    bar.update()
    for module in model.modules():
        for leaf, buffer in module._buffers.items():
            if buffer is not None and buffer.device != torch.device(device):
                module._buffers[leaf] = buffer.to(device)


def load_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype the stored tensor `name` is loaded in for a model in `dtype`."""
    if not tensor.is_floating_point():
        return tensor.dtype
    return torch.float32 if fnmatch.fnmatchcase(name, FLOAT32_TENSORS) else dtype


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float32 on CPU, bfloat16 on accelerators (the checkpoint's precision)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def prepare_model(
    checkpoint_dir: Path,
    *,
    vision_tower_dir: Path | None = None,
    audio_encoder_dir: Path | None = None,
) -> tuple[VitaQwen2ForCausalLM, dict[str, str]]:
    """The meta model and the weight map, once config, component folders and every stored
    name and shape (shard headers only) are checked; no weight is read."""
    checkpoint_dir = Path(checkpoint_dir)
    config = VitaConfig.from_checkpoint(
        checkpoint_dir, vision_tower_dir=vision_tower_dir, audio_encoder_dir=audio_encoder_dir
    )
    weight_map = read_weight_map(checkpoint_dir)
    stored = read_stored_shapes(checkpoint_dir, weight_map)
    stored_rows = stored.get(EMBED_KEY, (config.llm.vocab_size,))[0]
    if stored_rows != config.llm.vocab_size:
        log.info("embed_tokens/lm_head store %d rows (config says %d): using the stored size",
                 stored_rows, config.llm.vocab_size)
        config = config.with_vocab_size(stored_rows)
    model = build_on_meta(config)
    check_names_and_shapes(state_shapes(model), stored)
    return model, weight_map


def load_model(
    checkpoint_dir: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    *,
    vision_tower_dir: Path | None = None,
    audio_encoder_dir: Path | None = None,
    progress: bool = True,
) -> VitaQwen2ForCausalLM:
    """Load the composite model from a VITA-1.5 checkpoint folder (real or tiny)."""
    model, weight_map = prepare_model(
        checkpoint_dir, vision_tower_dir=vision_tower_dir, audio_encoder_dir=audio_encoder_dir
    )
    final_pt = model.config.audio_encoder_dir / "final.pt"
    if final_pt.is_file():
        log.info("audio encoder weights come from the main shards; %s is superseded "
                 "(upstream loads it, then the shards overwrite it)", final_pt)
    load_tensors(model, checkpoint_dir, weight_map, device, dtype or default_dtype(device), progress)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    """`python -m vita.checkpoint DIR`: check a checkpoint folder without reading its weights."""
    parser = argparse.ArgumentParser(description="Check a VITA-1.5 checkpoint folder (names, shapes, folders).")
    parser.add_argument("dir", type=Path)
    parser.add_argument("--vision-tower-dir", type=Path, help="InternViT folder, if not inside the checkpoint")
    parser.add_argument("--audio-encoder-dir", type=Path, help="whale folder, if not inside the checkpoint")
    args = parser.parse_args(argv)
    model, weight_map = prepare_model(
        args.dir, vision_tower_dir=args.vision_tower_dir, audio_encoder_dir=args.audio_encoder_dir
    )
    numbers = sum(math.prod(shape) for shape in state_shapes(model).values())
    print(f"{args.dir}: OK, {len(weight_map)} tensors in {len(set(weight_map.values()))} shards, "
          f"{numbers:,} numbers, {model.config.llm.vocab_size} vocabulary rows; "
          f"vision tower {model.config.vision_tower_dir}, audio encoder {model.config.audio_encoder_dir}")


if __name__ == "__main__":
    main()
