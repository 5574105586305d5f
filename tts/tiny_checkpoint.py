"""Deterministic random TTS checkpoints, tiny or at plausible full-size dims, in the `vita_tts_ckpt/` layout.

The decoder width is llm_hidden // 4, as in VITA-1.5 (3584 -> 896), so the tiny LLM's token
embeddings reshape to (-1, llm_hidden // 4). The codec keeps the real upsampling product 600
(24 kHz audio from 40 Hz codes) with small channels; one stage has 128 channels so the global
style vector is used. Codec convolutions are stored weight-normed (`weight_g`, `weight_v`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tts.codec import TiCodec
from tts.config import CodecConfig, DecoderConfig
from tts.decoder import LLM2TTSCodecAR

TINY_CODEC_VOCAB = 64
TINY_EOS_BIAS = 1.5  # with a zero eos row, random-text utterances end after ~25 codes (0.6 s) on average
# Full size: the other 1027 logits are about N(0, 1) (normed hidden state, 1/sqrt(fan-in) weights), so
# eos is drawn about once in 100 steps: utterances last about 100 codes (2.5 s), like a sentence.
FULL_SIZE_EOS_BIAS = 2.6


def tiny_decoder_config(llm_hidden: int = 64) -> DecoderConfig:
    """A 2-block decoder whose input width is `llm_hidden // 4`."""
    if llm_hidden % 4:
        raise ValueError("llm_hidden must be a multiple of 4")
    dim = llm_hidden // 4
    return DecoderConfig(
        idim=dim,
        odim=TINY_CODEC_VOCAB,
        transformer_attention_dim=dim,
        transformer_linear_units=2 * dim,
        transformer_attention_heads=2,
        transformer_num_blocks=2,
        encoder_output_dim=dim,
    )


def tiny_codec_config() -> CodecConfig:
    """A small codec with the real 600x upsampling and one 128-channel stage."""
    return CodecConfig(
        upsample_rates=(8, 5, 5, 3),
        upsample_kernel_sizes=(16, 11, 11, 5),
        upsample_initial_channel=256,
        resblock="1",
        resblock_kernel_sizes=(3, 5),
        resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)),
        n_codes=TINY_CODEC_VOCAB,
        n_code_groups=1,
        residul_layer=1,
        global_code_num=8,
        global_tokens=(3, 14, 15, 9, 26, 5, 35, 8),
    )


def full_size_decoder_config() -> DecoderConfig:
    """Plausible VITA-1.5 decoder dims (the real model.json ships only with the weights): 896 wide
    as the demos' `reshape(-1, 896)` implies; 4 blocks, 14 heads, 4864 FFN and 1024 codes follow a
    public Freeze-Omni re-implementation's configs (the same TTS)."""
    return DecoderConfig(
        idim=896, odim=1024, transformer_attention_dim=896, transformer_linear_units=4864,
        transformer_attention_heads=14, transformer_num_blocks=4, encoder_output_dim=896,
    )


def full_size_codec_config() -> CodecConfig:
    """Plausible TiCodec dims, from the same Freeze-Omni configs."""
    return CodecConfig(
        upsample_rates=(8, 5, 5, 3), upsample_kernel_sizes=(16, 11, 11, 5), upsample_initial_channel=512,
        resblock="1", resblock_kernel_sizes=(3, 7, 11), resblock_dilation_sizes=((1, 3, 5),) * 3,
        n_codes=1024, n_code_groups=1, residul_layer=1, global_code_num=8,
        global_tokens=(473, 975, 419, 219, 565, 121, 550, 616),
    )


def _randomise(module: nn.Module, generator: torch.Generator) -> None:
    """Every tensor random (norm gains around 1) so that tests exercise each weight."""
    for name, param in module.named_parameters():
        with torch.no_grad():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif "embedding" in name:
                param.copy_(noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / max(1, param[0].numel()) ** 0.5)


def _weight_normed(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Store each conv weight as (weight_g, weight_v) with v = weight, g = per-row norm."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name.endswith(".weight"):
            stem = name[: -len(".weight")]
            out[f"{stem}.weight_v"] = tensor
            out[f"{stem}.weight_g"] = tensor.flatten(1).norm(dim=1).view(-1, *([1] * (tensor.dim() - 1)))
        else:
            out[name] = tensor
    return out


def write_random_tts_checkpoint(
    tts_dir: Path, decoder_config: DecoderConfig, codec_config: CodecConfig, *, seed: int = 0, eos_bias: float | None = None
) -> None:
    """Random weights for any shapes in the upstream layout; `eos_bias` (with a zero eos row in
    `out_fnn`) sets how soon random utterances end, None leaves eos random."""
    tts_dir = Path(tts_dir)
    generator = torch.Generator().manual_seed(seed)
    decoder = LLM2TTSCodecAR(decoder_config)
    codec = TiCodec(codec_config)
    _randomise(decoder, generator)
    _randomise(codec, generator)
    if eos_bias is not None:
        with torch.no_grad():
            decoder.out_fnn.weight[decoder_config.eos_id] = 0.0
            decoder.out_fnn.bias[decoder_config.eos_id] = eos_bias

    (tts_dir / "decoder").mkdir(parents=True, exist_ok=True)
    (tts_dir / "decoder" / "model.json").write_text(json.dumps(decoder_config.to_model_json(), indent=2))
    torch.save({"model": decoder.state_dict()}, tts_dir / "decoder" / "final.pt")

    (tts_dir / "codec").mkdir(parents=True, exist_ok=True)
    (tts_dir / "codec" / "model.json").write_text(json.dumps(codec_config.to_model_json(), indent=2))
    torch.save(
        {
            "generator": _weight_normed(codec.generator.state_dict()),
            "quantizer": codec.quantizer.state_dict(),
            "encoder": {},  # the audio -> codes encoder is never used for synthesis
        },
        tts_dir / "codec" / "final.pt",
    )


def write_tiny_tts_checkpoint(tts_dir: Path, llm_hidden: int = 64, seed: int = 0) -> None:
    """Write `tts_dir/decoder/{model.json,final.pt}` and `tts_dir/codec/{model.json,final.pt}`."""
    write_random_tts_checkpoint(
        tts_dir, tiny_decoder_config(llm_hidden), tiny_codec_config(), seed=seed, eos_bias=TINY_EOS_BIAS
    )


def write_full_size_tts_checkpoint(tts_dir: Path, seed: int = 0) -> None:
    """The TTS at the full-size dims above, utterances of about a sentence's length."""
    write_random_tts_checkpoint(
        tts_dir, full_size_decoder_config(), full_size_codec_config(), seed=seed, eos_bias=FULL_SIZE_EOS_BIAS
    )
