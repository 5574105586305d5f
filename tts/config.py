"""Configs of the VITA-1.5 TTS, read from `vita_tts_ckpt/{decoder,codec}/model.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

CODEC_FRAME_SAMPLES = 600  # upstream hard-codes 600 samples per codec token (24 kHz / 40 Hz)
SAMPLE_RATE = 24000
TTS_DIR = "vita_tts_ckpt"  # the TTS folder inside a VITA-1.5 checkpoint
CODEC_LATENT_DIM = 512  # TiCodec fixes the quantizer/latent width at 512
GLOBAL_FEATURE_DIM = 128  # TiCodec fixes the global style feature width at 128


@dataclass(frozen=True)
class DecoderConfig:
    """Shapes of `LLM2TTSCodecAR` (the `args` of `decoder/model.json`).

    `odim` is the codec vocabulary; four special ids follow it: bos, sos, eos, pad.
    The Llama layers use transformers' LlamaConfig defaults that upstream does not override
    (rms_norm_eps 1e-6, rope_theta 10000, as many key/value heads as query heads, no biases).
    """

    idim: int
    odim: int
    transformer_attention_dim: int
    transformer_linear_units: int
    transformer_attention_heads: int
    transformer_num_blocks: int
    encoder_output_dim: int
    kv_cache_prefix_finetune: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        dims = {self.idim, self.transformer_attention_dim, self.encoder_output_dim}
        if len(dims) != 1:
            raise ValueError(
                f"idim, transformer_attention_dim and encoder_output_dim must be equal, got {sorted(dims)}"
            )
        if self.transformer_attention_dim % self.transformer_attention_heads:
            raise ValueError("transformer_attention_dim must be a multiple of transformer_attention_heads")

    @property
    def head_dim(self) -> int:
        return self.transformer_attention_dim // self.transformer_attention_heads

    @property
    def bos_id(self) -> int:
        return self.odim

    @property
    def sos_id(self) -> int:
        return self.odim + 1

    @property
    def eos_id(self) -> int:
        return self.odim + 2

    @property
    def pad_id(self) -> int:
        return self.odim + 3

    @classmethod
    def from_model_json(cls, path: Path) -> "DecoderConfig":
        """Parse the upstream `[idim, odim, args]` list; unknown training fields are ignored."""
        idim, odim, args = json.loads(Path(path).read_text())
        fields = {name: args[name] for name in cls.__dataclass_fields__ if name in args}
        return cls(**{**fields, "idim": idim, "odim": odim})

    def to_model_json(self) -> list:
        """The upstream `[idim, odim, args]` list."""
        return [self.idim, self.odim, asdict(self)]


@dataclass(frozen=True)
class CodecConfig:
    """Shapes of the TiCodec generator and quantizer (`codec/model.json`).

    `global_tokens` are the fixed speaker/style codes VITA-1.5 decodes every utterance with.
    """

    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock: str
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    n_codes: int
    n_code_groups: int
    residul_layer: int
    global_code_num: int
    global_tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        product = 1
        for rate, kernel in zip(self.upsample_rates, self.upsample_kernel_sizes, strict=True):
            product *= rate
            if (kernel - rate) % 2:
                raise ValueError(f"upsample kernel {kernel} - rate {rate} must be even for exact length")
        if product != CODEC_FRAME_SAMPLES:
            raise ValueError(f"product of upsample_rates must be {CODEC_FRAME_SAMPLES}, got {product}")
        if self.resblock not in ("1", "2"):
            raise ValueError(f"resblock must be '1' or '2', got {self.resblock!r}")
        if CODEC_LATENT_DIM % self.n_code_groups or GLOBAL_FEATURE_DIM % self.global_code_num:
            raise ValueError("n_code_groups must divide 512 and global_code_num must divide 128")
        if len(self.global_tokens) != self.global_code_num:
            raise ValueError("global_tokens must hold global_code_num codes")

    @property
    def codes_per_frame(self) -> int:
        return self.n_code_groups * self.residul_layer

    @classmethod
    def from_model_json(cls, path: Path) -> "CodecConfig":
        """Parse `codec/model.json`; training-only fields are ignored."""
        data = json.loads(Path(path).read_text())
        return cls(
            upsample_rates=tuple(data["upsample_rates"]),
            upsample_kernel_sizes=tuple(data["upsample_kernel_sizes"]),
            upsample_initial_channel=data["upsample_initial_channel"],
            resblock=str(data["resblock"]),
            resblock_kernel_sizes=tuple(data["resblock_kernel_sizes"]),
            resblock_dilation_sizes=tuple(tuple(d) for d in data["resblock_dilation_sizes"]),
            n_codes=data["n_codes"],
            n_code_groups=data["n_code_groups"],
            residul_layer=data["residul_layer"],
            global_code_num=data["global_code_num"],
            global_tokens=tuple(data["global_tokens"]),
        )

    def to_model_json(self) -> dict:
        return asdict(self)
