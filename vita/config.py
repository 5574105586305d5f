"""`VitaConfig`: the VITA-1.5 composite config and its `config.json` in the checkpoint folder.

`config.json` holds the Qwen2 fields plus `mm_*` fields. `mm_vision_tower` and
`mm_audio_encoder` name the InternViT folder (its `config.json`) and the whale folder (its
`train.yaml`); upstream writes absolute paths of the training machine there, so a folder of
the same name inside the checkpoint is looked for first.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from vita.intern_vit import VisionConfig
from vita.qwen2 import LLMConfig
from vita.whale import AudioEncoderConfig

MODEL_TYPE = "vita-Qwen2"
PROJECTOR_TYPE = "mlp2x_gelu"
VISION_TOWER_DIR = "InternViT-300M-448px"
AUDIO_ENCODER_DIR = "audio-encoder-Qwen2-7B-1107-weight-base-11wh-tunning"
TINY_VOCAB_SIZE = 1024


@dataclass(frozen=True)
class VitaConfig:
    """LLM, vision tower and audio encoder configs; where their folders were found, if read from disk."""

    llm: LLMConfig
    vision: VisionConfig
    audio: AudioEncoderConfig
    vision_tower_dir: Path | None = None
    audio_encoder_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.audio.llm_hidden_size != self.llm.hidden_size:
            raise ValueError(
                f"audio adapter projects to {self.audio.llm_hidden_size}, the LLM hidden size is {self.llm.hidden_size}"
            )

    @property
    def mm_hidden_size(self) -> int:
        """Input width of the vision projector (vision features after pixel shuffle)."""
        return self.vision.output_size

    @classmethod
    def full(cls) -> VitaConfig:
        """VITA-1.5: Qwen2.5-7B, InternViT-300M-448px, whale encoder."""
        return cls(LLMConfig.full(), VisionConfig.full(), AudioEncoderConfig.full())

    @classmethod
    def tiny(cls) -> VitaConfig:
        """Test dims: LLM hidden 64 (the tiny TTS width 16 divides it)."""
        llm = LLMConfig.tiny(vocab_size=TINY_VOCAB_SIZE)
        return cls(llm, VisionConfig.tiny(), AudioEncoderConfig.tiny(llm_hidden_size=llm.hidden_size))

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir: Path,
        *,
        vision_tower_dir: Path | None = None,
        audio_encoder_dir: Path | None = None,
    ) -> VitaConfig:
        """Read `config.json` and the component folders it names (or the given overrides)."""
        checkpoint_dir = Path(checkpoint_dir)
        config_path = checkpoint_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint folder {checkpoint_dir}")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path}: not valid JSON ({error})") from error
        if raw.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{config_path}: model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
        if raw.get("mm_projector_type", PROJECTOR_TYPE) != PROJECTOR_TYPE:
            raise ValueError(f"{config_path}: only mm_projector_type {PROJECTOR_TYPE!r} is supported")
        vision_dir = resolve_component_dir(checkpoint_dir, raw.get("mm_vision_tower"), vision_tower_dir, "mm_vision_tower")
        audio_dir = resolve_component_dir(checkpoint_dir, raw.get("mm_audio_encoder"), audio_encoder_dir, "mm_audio_encoder")
        config = cls(
            llm=LLMConfig.from_hf_config(raw),
            vision=VisionConfig.from_json(_component_file(vision_dir, "config.json")),
            audio=AudioEncoderConfig.from_train_yaml(_component_file(audio_dir, "train.yaml")),
            vision_tower_dir=vision_dir,
            audio_encoder_dir=audio_dir,
        )
        if raw.get("mm_hidden_size", config.mm_hidden_size) != config.mm_hidden_size:
            raise ValueError(
                f"{config_path}: mm_hidden_size {raw['mm_hidden_size']} does not match the vision tower "
                f"in {vision_dir} ({config.mm_hidden_size})"
            )
        return config

    def to_config_json(self, vision_tower: str, audio_encoder: str) -> dict:
        """The checkpoint's `config.json` (Qwen2 fields + `mm_*` fields), naming the component folders."""
        llm = self.llm
        return {
            "architectures": ["VITAQwen2ForCausalLM"],
            "model_type": MODEL_TYPE,
            "hidden_act": "silu",
            "hidden_size": llm.hidden_size,
            "intermediate_size": llm.intermediate_size,
            "num_hidden_layers": llm.num_hidden_layers,
            "num_attention_heads": llm.num_attention_heads,
            "num_key_value_heads": llm.num_key_value_heads,
            "rms_norm_eps": llm.rms_norm_eps,
            "rope_theta": llm.rope_theta,
            "max_position_embeddings": llm.max_position_embeddings,
            "vocab_size": llm.vocab_size,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            "torch_dtype": "float32",
            "mm_vision_tower": vision_tower,
            "mm_audio_encoder": audio_encoder,
            "mm_projector_type": PROJECTOR_TYPE,
            "mm_hidden_size": self.mm_hidden_size,
            "use_mm_proj": True,
            "image_aspect_ratio": "square",
            "freeze_audio_encoder": True,
            "freeze_audio_encoder_adapter": False,
            "audio_prompt_finetune": False,
            "tokenizer_model_max_length": 6200,
            "tokenizer_padding_side": "right",
        }

    def with_vocab_size(self, vocab_size: int) -> VitaConfig:
        """This config with `vocab_size` rows of `embed_tokens` / `lm_head`."""
        return dataclasses.replace(self, llm=dataclasses.replace(self.llm, vocab_size=vocab_size))


def resolve_component_dir(checkpoint_dir: Path, configured: str | None, override: Path | None, field: str) -> Path:
    """Folder of a component: the override, else `configured`'s basename inside the checkpoint,
    else `configured` relative to the checkpoint or as an absolute path."""
    if override is not None:
        if not Path(override).is_dir():
            raise FileNotFoundError(f"{field} folder given explicitly does not exist: {override}")
        return Path(override)
    if not configured:
        raise FileNotFoundError(f"config.json has no {field}; pass its folder explicitly")
    candidates = [checkpoint_dir / Path(configured).name, checkpoint_dir / configured, Path(configured)]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"{field} is {configured!r}: no folder {Path(configured).name!r} inside {checkpoint_dir} and the "
        f"path does not exist here; put the folder in the checkpoint or pass it explicitly"
    )


def _component_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"missing {name} in component folder {folder}")
    return path
