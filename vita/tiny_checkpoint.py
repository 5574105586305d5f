"""`vita-make-tiny-checkpoint DIR`: a deterministic tiny random VITA-1.5 checkpoint.

Same folder layout and tensor names as the real checkpoint, tiny sizes, seeded random
weights, a small real byte-level BPE tokenizer; re-running writes identical bytes.
The replies of a model loaded from it are noise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from tts.tiny_checkpoint import write_tiny_tts_checkpoint
from vita.checkpoint import INDEX_FILE, build_on_meta
from vita.config import AUDIO_ENCODER_DIR, VISION_TOWER_DIR, VitaConfig
from vita.prompt import SYSTEM_PROMPTS
from vita.tokenizer import END_OF_TEXT, IM_END, IM_START
from vita.whale import write_global_cmvn

SEED = 0
NUM_SHARDS = 2
TOKENIZER_VOCAB_SIZE = 1000
TINY_CHECKPOINT_VERSION = 1
# config.json names the component folders by absolute paths of a training machine, as upstream does.
UPSTREAM_WEIGHTS_ROOT = "/path/to/model_weights"

# Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen2.5).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TRAINING_TEXT = [
    *SYSTEM_PROMPTS.values(),
    "☞ Hello! How can I help you today? ☞ Sure, I can describe what I see in the picture.",
    "☟ ☜ The weather today is sunny and warm, with a light breeze from the west.",
    "Hello, can you hear me? Please describe the image. What is the weather like today?",
    "The picture shows a red square on a blue background, next to a small green circle.",
    "I am VITA, an open source multimodal assistant. I can listen, look and talk with you.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024. Punctuation: , . ! ? ; : ( ) - ' \"",
    "☞ 你好！今天天气怎么样？今天天气晴朗，气温二十五度，适合出去散步。",
    "☞ 我是VITA，一个开源的多模态大语言模型。我可以听、看，也可以和你对话。",
    "☜ 图片里有一个红色的正方形和一个绿色的圆形，背景是蓝色的。请问还有什么问题？",
    "☟ 好的，谢谢你。再见！明天见。我们一起学习，一起进步。",
]


def build_tiny_tokenizer() -> Tokenizer:
    """Train a Qwen2-style byte-level BPE (NFC, Qwen2 split regex) on the embedded text.

    The special tokens come after the learned vocabulary, as in Qwen2. Byte-level BPE
    can encode any text, so ☞ ☟ ☜ always tokenize (they are in the training text too).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    special_tokens = [END_OF_TEXT, IM_START, IM_END]
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE - len(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer)
    tokenizer.add_special_tokens(special_tokens)
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    """A Qwen2-style `tokenizer_config.json` for the tiny tokenizer."""
    special = {
        str(tokenizer.token_to_id(token)): {
            "content": token, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True,
        }
        for token in (END_OF_TEXT, IM_START, IM_END)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": special,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": END_OF_TEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(out_dir: Path) -> Tokenizer:
    """tokenizer.json, vocab.json, merges.txt and tokenizer_config.json, as a Qwen2 checkpoint has."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer.model.save(str(out_dir))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(tokenizer))
    return tokenizer


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def random_state_dict(config: VitaConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded random values for every tensor of the model, in state_dict order.

    Matrices are scaled by 1/sqrt(fan-in), norm gains and layer scales sit around 1, CMVN
    statistics look like log-mel ones (mean ~12, istd ~0.3).
    """
    state = {}
    for name, tensor in build_on_meta(config).state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
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
        state[name] = value.contiguous()
    return state


def write_shards(out_dir: Path, state: dict[str, torch.Tensor], num_shards: int = NUM_SHARDS) -> None:
    """`model-0000k-of-0000n.safetensors` (consecutive tensors, balanced by size) + the index."""
    total_bytes = sum(t.numel() * t.element_size() for t in state.values())
    shard_of = {}
    written = 0
    for name, tensor in state.items():
        shard_of[name] = min(num_shards - 1, written * num_shards // total_bytes)
        written += tensor.numel() * tensor.element_size()
    file_names = [f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors" for k in range(num_shards)]
    for k, file_name in enumerate(file_names):
        tensors = {name: tensor for name, tensor in state.items() if shard_of[name] == k}
        save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": {name: file_names[shard_of[name]] for name in sorted(state)},
    }
    _write_json(out_dir / INDEX_FILE, index)


def write_audio_encoder_dir(folder: Path, config: VitaConfig, state: dict[str, torch.Tensor]) -> None:
    """train.yaml, global_cmvn and final.pt (the encoder's own state_dict, superseded by the shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    config.audio.to_train_yaml(folder / "train.yaml")
    prefix = "model.audio_encoder."
    encoder_state = {name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)}
    write_global_cmvn(folder / "global_cmvn", encoder_state["encoder.global_cmvn.mean"],
                      encoder_state["encoder.global_cmvn.istd"])
    torch.save(encoder_state, folder / "final.pt")


def write_tiny_checkpoint(out_dir: Path, seed: int = SEED) -> Path:
    """Write the whole tiny checkpoint folder; returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = VitaConfig.tiny()
    state = random_state_dict(config, torch.Generator().manual_seed(seed))
    tokenizer = write_tokenizer(out_dir)
    if tokenizer.get_vocab_size() > config.llm.vocab_size:
        raise ValueError("tiny tokenizer is larger than the tiny LLM vocabulary")
    config_json = config.to_config_json(
        vision_tower=f"{UPSTREAM_WEIGHTS_ROOT}/{VISION_TOWER_DIR}",
        audio_encoder=f"{UPSTREAM_WEIGHTS_ROOT}/{AUDIO_ENCODER_DIR}",
    )
    _write_json(out_dir / "config.json", config_json)
    _write_json(out_dir / "generation_config.json", {
        "eos_token_id": tokenizer.token_to_id(IM_END),
        "pad_token_id": tokenizer.token_to_id(END_OF_TEXT),
    })
    write_shards(out_dir, state)
    write_audio_encoder_dir(out_dir / AUDIO_ENCODER_DIR, config, state)
    (out_dir / VISION_TOWER_DIR).mkdir(exist_ok=True)
    config.vision.to_json(out_dir / VISION_TOWER_DIR / "config.json")
    write_tiny_tts_checkpoint(out_dir / "vita_tts_ckpt", llm_hidden=config.llm.hidden_size, seed=seed)
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
    parser.add_argument("dir", type=Path, help="folder to write the tiny checkpoint into")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    path = write_tiny_checkpoint(args.dir, seed=args.seed)
    print(f"tiny random VITA-1.5 checkpoint written to {path} (its replies are noise)")


if __name__ == "__main__":
    main()
