"""Whale audio encoder of VITA-1.5 with its LLM adapter.

fbank ``[B, T, 80]`` -> global CMVN (in float32, then cast to the model dtype) -> Conv2dSubsampling4
(T/4) -> relative-position transformer (pre-norm) -> adapter (stride-2 conv, LayerNorm, GELU,
projection; T/8) -> ``[B, T', llm_hidden]``.

State-dict keys mirror the checkpoint with ``model.audio_encoder.`` stripped:
``encoder.enc.0.core.{conv.0,conv.2,out.0}``, ``encoder.enc.1.{embed.0,embed.1,encoders.N,after_norm}``,
``encoder.global_cmvn.{mean,istd}``, ``adpter.{conv1d2,bn2,project}``.

Attention context follows upstream's non-streaming forward: with ``dynamic_chunks`` off and
``chunk_size > 0`` a frame sees its chunk and ``left_chunks`` chunks before it; otherwise the whole
utterance. (With ``dynamic_chunks`` on, upstream draws a random chunk size on every forward, even in
eval; the whole utterance is what its full-context decoding and the VITA-1.5 vLLM demo use.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from layers.attention import attention
from vita.fbank import fbank_many
from vita.plain_conv import conv_without_cudnn

# Score of a masked attention entry (upstream fills float16's lowest value).
MASKED_SCORE = float(torch.finfo(torch.float16).min)
# Fewest fbank frames the two stride-2 3x3 convolutions accept.
MIN_FBANK_FRAMES = 7


@dataclass(frozen=True)
class AudioEncoderConfig:
    """Whale encoder + adapter dimensions, attention-chunk settings and fbank settings."""

    input_dim: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    num_blocks: int
    chunk_size: int
    left_chunks: int
    dynamic_chunks: bool
    adapter_kernel_size: int
    llm_hidden_size: int
    dither: float
    sample_rate: int = 16000
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    is_json_cmvn: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def full(cls) -> AudioEncoderConfig:
        """VITA-1.5 dims (reference TSV); chunk settings per the reference README's train.yaml assumptions."""
        return cls(input_dim=80, hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                   num_blocks=24, chunk_size=4, left_chunks=16, dynamic_chunks=False,
                   adapter_kernel_size=5, llm_hidden_size=3584, dither=1.0)

    @classmethod
    def tiny(cls, llm_hidden_size: int = 64) -> AudioEncoderConfig:
        """Small dims for tests, deterministic features (no dither)."""
        return cls(input_dim=80, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                   num_blocks=2, chunk_size=4, left_chunks=2, dynamic_chunks=False,
                   adapter_kernel_size=5, llm_hidden_size=llm_hidden_size, dither=0.0)

    @classmethod
    def from_train_yaml(cls, path: str | Path) -> AudioEncoderConfig:
        """Read the audio-encoder folder's ``train.yaml`` the way upstream ``init_model`` does.

        Missing transformer keys take upstream's argparse defaults; layouts other than VITA-1.5's
        (``subsampling-transformer``, ``rel-enc``, pre-norm, ``subsampling`` adapter with LayerNorm
        and GELU) are rejected.
        """
        configs = yaml.safe_load(Path(path).read_text())
        encoder_conf = configs["encoder_conf"]
        overview = _dashes_to_underscores(encoder_conf["overview_conf"])
        para = {name: _dashes_to_underscores(values) for name, values in encoder_conf["para_conf"].items()}
        subsampling, transformer = para["subsampling"], para["transformer"]
        model_conf = configs["model_conf"]
        fbank_conf = configs.get("dataset_conf", {}).get("fbank_conf", {})
        resample_conf = configs.get("dataset_conf", {}).get("resample_conf", {})
        _require(overview.get("encoder_layer_config"), "subsampling-transformer", "encoder-layer-config")
        _require(subsampling.get("subsampling_rate", 4), 4, "subsampling-rate")
        _require(transformer.get("transformer_input_layer", "linear"), "linear", "transformer-input-layer")
        _require(transformer.get("transformer_pos_enc_class", "abs-enc"), "rel-enc", "transformer-pos-enc-class")
        _require(transformer.get("transformer_normalize_before", True), True, "transformer-normalize-before")
        _require(transformer.get("transformer_concat_after", False), False, "transformer-concat-after")
        _require(transformer.get("transformer_positionwise_layer_type", "linear"), "linear",
                 "transformer-positionwise-layer-type")
        _require(model_conf.get("adpter_type", "cnn"), "subsampling", "adpter_type")
        _require(model_conf.get("norm", "batch"), "layer", "norm")
        _require(model_conf.get("activation_func", "relu"), "gelu", "activation_func")
        _require(fbank_conf.get("num_mel_bins", configs["input_dim"]), configs["input_dim"], "num_mel_bins")
        hidden = transformer.get("transformer_attention_dim", 256)
        for name, value in [("encoder-input-dim", overview.get("encoder_input_dim", 256)),
                            ("subsampling-input-dim", subsampling.get("subsampling_input_dim", 256))]:
            _require(value, configs["input_dim"], name)
        for name, value in [("encoder-output-dim", overview.get("encoder_output_dim", 256)),
                            ("subsampling-output-dim", subsampling.get("subsampling_output_dim", 256)),
                            ("transformer-input-dim", transformer.get("transformer_input_dim", 256)),
                            ("transformer-output-dim", transformer.get("transformer_output_dim", 4)),
                            ("enc_out_dim", model_conf.get("enc_out_dim", 512))]:
            _require(value, hidden, name)
        return cls(
            input_dim=configs["input_dim"],
            hidden_size=hidden,
            num_attention_heads=transformer.get("transformer_attention_heads", 4),
            intermediate_size=transformer.get("transformer_linear_units", 1024),
            num_blocks=transformer.get("transformer_num_blocks", 6),
            chunk_size=transformer.get("transformer_chunk_size", -1),
            left_chunks=transformer.get("transformer_left_chunks", -1),
            dynamic_chunks=bool(transformer.get("transformer_dynamic_chunks", True)),
            adapter_kernel_size=model_conf.get("kernel_size", 3),
            llm_hidden_size=model_conf.get("llm_embed_dim", 4096),
            dither=float(fbank_conf.get("dither", 0.0)),
            sample_rate=resample_conf.get("resample_rate", 16000),
            frame_length_ms=float(fbank_conf.get("frame_length", 25)),
            frame_shift_ms=float(fbank_conf.get("frame_shift", 10)),
            is_json_cmvn=bool(configs.get("is_json_cmvn", True)),
        )

    def to_train_yaml(self, path: str | Path) -> None:
        """Write a ``train.yaml`` with every field upstream ``init_model`` reads."""
        hidden = self.hidden_size
        configs = {
            "input_dim": self.input_dim,
            "is_json_cmvn": self.is_json_cmvn,
            "cmvn_file": "global_cmvn",
            "encoder_conf": {
                "overview_conf": {
                    "encoder-input-dim": self.input_dim,
                    "encoder-output-dim": hidden,
                    "encoder-layer-config": "subsampling-transformer",
                },
                "para_conf": {
                    "subsampling": {
                        "subsampling-rate": 4,
                        "subsampling-input-dim": self.input_dim,
                        "subsampling-output-dim": hidden,
                        "subsampling-dropout-rate": 0.1,
                    },
                    "transformer": {
                        "transformer-input-dim": hidden,
                        "transformer-output-dim": hidden,
                        "transformer-attention-dim": hidden,
                        "transformer-attention-heads": self.num_attention_heads,
                        "transformer-linear-units": self.intermediate_size,
                        "transformer-num-blocks": self.num_blocks,
                        "transformer-dropout-rate": 0.1,
                        "transformer-attention-dropout-rate": 0.0,
                        "transformer-positional-dropout-rate": 0.1,
                        "transformer-input-layer": "linear",
                        "transformer-pos-enc-class": "rel-enc",
                        "transformer-normalize-before": True,
                        "transformer-concat-after": False,
                        "transformer-positionwise-layer-type": "linear",
                        "transformer-chunk_size": self.chunk_size,
                        "transformer-left_chunks": self.left_chunks,
                        "transformer-dynamic-chunks": self.dynamic_chunks,
                    },
                },
            },
            "model_conf": {
                "llm_path": "",
                "freeze_llm": True,
                "enc_out_dim": hidden,
                "llm_embed_dim": self.llm_hidden_size,
                "kernel_size": self.adapter_kernel_size,
                "adpter_type": "subsampling",
                "activation_func": "gelu",
                "norm": "layer",
            },
            "dataset_conf": {
                "resample_conf": {"resample_rate": self.sample_rate},
                "fbank_conf": {
                    "num_mel_bins": self.input_dim,
                    "frame_length": self.frame_length_ms,
                    "frame_shift": self.frame_shift_ms,
                    "dither": self.dither,
                },
            },
        }
        Path(path).write_text(yaml.safe_dump(configs, sort_keys=False))


def _dashes_to_underscores(values: dict) -> dict:
    """Upstream reads ``a-b`` and ``a_b`` yaml keys alike."""
    return {key.replace("-", "_"): value for key, value in values.items()}


def _require(value: object, expected: object, name: str) -> None:
    if value != expected:
        raise ValueError(f"train.yaml: {name} is {value!r}; VITA-1.5's whale encoder needs {expected!r}")


def read_global_cmvn(path: str | Path, is_json: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, istd)`` float32 from a ``global_cmvn`` file (WeNet json stats or Kaldi text stats)."""
    text = Path(path).read_text()
    if is_json:
        stats = json.loads(text)
        sums, squares, count = stats["mean_stat"], stats["var_stat"], stats["frame_num"]
    else:
        tokens = text.split()
        if tokens[0] != "[" or tokens[-2] != "0" or tokens[-1] != "]":
            raise ValueError(f"{path}: not a Kaldi text CMVN stats matrix")
        dim = (len(tokens) - 4) // 2
        sums = [float(t) for t in tokens[1:dim + 1]]
        count = float(tokens[dim + 1])
        squares = [float(t) for t in tokens[dim + 2:2 * dim + 2]]
    mean = np.asarray(sums, dtype=np.float64) / count
    variance = np.maximum(np.asarray(squares, dtype=np.float64) / count - mean**2, 1.0e-20)
    return torch.from_numpy(mean).float(), torch.from_numpy(1.0 / np.sqrt(variance)).float()


def write_global_cmvn(path: str | Path, mean: torch.Tensor, istd: torch.Tensor, frame_num: int = 1) -> None:
    """Write ``(mean, istd)`` as WeNet json stats (per-dim sums and sums of squares over ``frame_num``)."""
    mean64 = mean.double()
    variance = istd.double().pow(-2)
    stats = {
        "mean_stat": (mean64 * frame_num).tolist(),
        "var_stat": ((variance + mean64**2) * frame_num).tolist(),
        "frame_num": frame_num,
    }
    Path(path).write_text(json.dumps(stats))


def subsampled_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Valid frames after Conv2dSubsampling4 (upstream keeps mask[2::2][2::2])."""
    after_first = torch.clamp((lengths - 1) // 2, min=0)
    return torch.clamp((after_first - 1) // 2, min=0)


def output_lengths(fbank_lengths: torch.Tensor) -> torch.Tensor:
    """LLM audio tokens for ``fbank_lengths`` frames (upstream keeps mask[2::2][2::2][0::2])."""
    return (subsampled_lengths(fbank_lengths) + 1) // 2


def sinusoid_positions(length: int, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Absolute sinusoidal table ``[1, length, dim]``: sin on even, cos on odd channels."""
    position = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table[None]


def attention_mask(key_valid: torch.Tensor, chunk_size: int, left_chunks: int) -> torch.Tensor:
    """``[B, T, T]`` bool: query ``i`` attends key ``j`` if ``j`` is valid and inside ``i``'s chunk window.

    The window is ``i``'s chunk plus ``left_chunks`` chunks before it (all before it when negative);
    ``chunk_size <= 0`` means full context.
    """
    length = key_valid.shape[1]
    if chunk_size <= 0:
        return key_valid[:, None, :].expand(-1, length, -1)
    chunk = torch.arange(length, device=key_valid.device) // chunk_size
    query_chunk, key_chunk = chunk[:, None], chunk[None, :]
    window = key_chunk <= query_chunk
    if left_chunks >= 0:
        window = window & (key_chunk >= query_chunk - left_chunks)
    return key_valid[:, None, :] & window[None]


class GlobalCMVN(nn.Module):
    """``(x - mean) * istd`` with corpus statistics, in float32 whatever the model dtype.

    Log-mel values sit near 13: bf16 would round them by up to 0.03 before the mean is taken away.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("istd", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean.float()) * self.istd.float()


class Conv2dSubsampling4(nn.Module):
    """Two 3x3 stride-2 convolutions over (time, mel) and a projection of channels x mel to ``hidden``."""

    def __init__(self, input_dim: int, hidden: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, hidden, 3, 2), nn.ReLU(), nn.Conv2d(hidden, hidden, 3, 2), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(hidden * (((input_dim - 1) // 2 - 1) // 2), hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(conv_without_cudnn(self.conv[0], x[:, None]))
        x = torch.relu(conv_without_cudnn(self.conv[2], x))  # [B, C, T', F']
        batch, channels, time, freq = x.shape
        return self.out(x.transpose(1, 2).reshape(batch, time, channels * freq))


class Subsampling(nn.Module):
    """Upstream's subsampling component wrapper (``enc.0``), holding the ``core`` layer."""

    def __init__(self, input_dim: int, hidden: int):
        super().__init__()
        self.core = Conv2dSubsampling4(input_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(x)


class RelPositionMultiHeadedAttention(nn.Module):
    """Transformer-XL style attention as whale computes it (no relative shift).

    ``score[i, j] = ((q_i + u) . k_j + (q_i + v) . p_j) / sqrt(d_k)`` where ``p_j = linear_pos(pe[j])``
    projects the absolute sinusoid of key position ``j``.
    """

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.linear_q = nn.Linear(hidden, hidden)
        self.linear_k = nn.Linear(hidden, hidden)
        self.linear_v = nn.Linear(hidden, hidden)
        self.linear_out = nn.Linear(hidden, hidden)
        self.linear_pos = nn.Linear(hidden, hidden, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.empty(heads, self.head_dim))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D]``, ``pos_emb [1, T, D]``, ``mask [B, T, T]`` bool (True = attend)."""
        q = self._split_heads(self.linear_q(x))
        k = self._split_heads(self.linear_k(x)).transpose(1, 2)
        v = self._split_heads(self.linear_v(x)).transpose(1, 2)
        p = self._split_heads(self.linear_pos(pos_emb.to(x.dtype))).transpose(1, 2)
        q_content = (q + self.pos_bias_u).transpose(1, 2)
        q_position = (q + self.pos_bias_v).transpose(1, 2)
        position_scores = q_position @ p.transpose(-2, -1) / math.sqrt(self.head_dim)
        bias = position_scores.masked_fill(~mask[:, None], MASKED_SCORE)
        out = attention(q_content, k, v, bias)
        return self.linear_out(out.transpose(1, 2).flatten(2))


class PositionwiseFeedForward(nn.Module):
    """``w_2(relu(w_1(x)))``."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w_1 = nn.Linear(hidden, intermediate)
        self.w_2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(torch.relu(self.w_1(x)))


class TransformerLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + ffn(norm2(x))``."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(config.hidden_size, config.num_attention_heads)
        self.feed_forward = PositionwiseFeedForward(config.hidden_size, config.intermediate_size)
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.norm2 = nn.LayerNorm(config.hidden_size)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), pos_emb, mask)
        return x + self.feed_forward(self.norm2(x))


class Transformer(nn.Module):
    """``embed`` (Linear, LayerNorm, then ReLU), scaling by sqrt(D), blocks, ``after_norm``."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.embed = nn.Sequential(nn.Linear(hidden, hidden), nn.LayerNorm(hidden))
        self.encoders = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_blocks))
        self.after_norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D]``, ``valid [B, T]`` bool."""
        config = self.config
        chunk_size = -1 if config.dynamic_chunks else config.chunk_size
        mask = attention_mask(valid, chunk_size, config.left_chunks)
        x = torch.relu(self.embed(x)) * math.sqrt(config.hidden_size)
        pos_emb = sinusoid_positions(x.shape[1], config.hidden_size, x.device)
        for layer in self.encoders:
            x = layer(x, pos_emb, mask)
        return self.after_norm(x)


class WhaleEncoder(nn.Module):
    """``enc`` = [subsampling, transformer], preceded by ``global_cmvn``."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.enc = nn.ModuleList([Subsampling(config.input_dim, config.hidden_size), Transformer(config)])
        self.global_cmvn = GlobalCMVN(config.input_dim)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fbank ``[B, T, F]`` -> ``([B, T', D], valid [B, T'])`` with ``T' = ((T - 1) // 2 - 1) // 2``.

        CMVN runs in float32; only its output is cast to the weights' dtype.
        """
        x = self.enc[0](self.global_cmvn(feats).to(self.enc[0].core.conv[0].weight.dtype))
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < subsampled_lengths(lengths)[:, None]
        return self.enc[1](x, valid), valid


class CNNSubsamplingAdapter(nn.Module):
    """Stride-2 conv (kernel k, k-1 zeros padded on the right), LayerNorm(eps 1e-3), GELU, projection."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        hidden = config.hidden_size
        self.right_padding = config.adapter_kernel_size - 1
        self.conv1d2 = nn.Conv1d(hidden, 2 * hidden, config.adapter_kernel_size, stride=2)
        self.bn2 = nn.LayerNorm(2 * hidden, eps=1e-3)
        self.project = nn.Linear(2 * hidden, config.llm_hidden_size)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D]`` with padding frames (``~valid``) zeroed -> ``[B, (T + 1) // 2, llm_hidden]``."""
        x = x.masked_fill(~valid[:, :, None], 0.0).transpose(1, 2)
        x = conv_without_cudnn(self.conv1d2, F.pad(x, (0, self.right_padding))).transpose(1, 2)
        return self.project(F.gelu(self.bn2(x)))


class WhaleAudioEncoder(nn.Module):
    """VITA-1.5 ``audio_encoder``: whale ``encoder`` + ``adpter`` to the LLM hidden size."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = WhaleEncoder(config)
        self.adpter = CNNSubsamplingAdapter(config)

    def forward(self, fbank_feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fbank ``[B, T, input_dim]`` + frame counts ``[B]`` -> (``[B, T', llm_hidden]``, valid counts ``[B]``)."""
        if fbank_feats.shape[1] < MIN_FBANK_FRAMES:
            raise ValueError(f"audio too short: {fbank_feats.shape[1]} fbank frames, need {MIN_FBANK_FRAMES}")
        hidden, valid = self.encoder(fbank_feats, lengths)
        return self.adpter(hidden, valid), output_lengths(lengths)

    def waveform_features(self, wave_16k: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """Upstream's fbank ``[T, input_dim]`` of a float waveform in [-1, 1]: Kaldi fbank of ``wave * 32768``."""
        return self.waveform_features_many([wave_16k], generator)[0]

    def waveform_features_many(self, waves_16k: Sequence[np.ndarray],
                               generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """`waveform_features` of each waveform, computed together: one copy to the device, one fbank."""
        config = self.config
        for wave in waves_16k:
            if np.ndim(wave) != 1:
                raise ValueError(f"expected a mono waveform, got shape {np.shape(wave)}")
        joined = np.concatenate([np.asarray(wave, dtype=np.float32) for wave in waves_16k])
        samples = torch.from_numpy(joined).to(self.adpter.project.weight.device) * 32768.0
        return fbank_many(samples.split([len(wave) for wave in waves_16k]), num_mel_bins=config.input_dim,
                          sample_rate=config.sample_rate, frame_length_ms=config.frame_length_ms,
                          frame_shift_ms=config.frame_shift_ms, dither=config.dither, generator=generator)

    @torch.inference_mode()
    def encode_waveform(self, wave_16k: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """16 kHz mono float32 waveform -> LLM audio embeddings ``[T', llm_hidden]``."""
        feats = self.waveform_features(wave_16k, generator)
        lengths = torch.tensor([feats.shape[0]], device=feats.device)
        features, _ = self(feats[None], lengths)
        return features[0]
