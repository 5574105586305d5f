"""TiCodec decoder side: quantizer codebooks + HiFi-GAN style generator, 40 Hz codes -> 24 kHz audio.

Upstream (`ticodec/models.py`, `vqvae.py`): codes index the codebooks (`quantizer.embed`), the
fixed `global_tokens` index the global codebooks (`embed_gst`, a 128-d style vector) and the
generator upsamples by 600 with the style vector added after the stage that has 128 channels.
The checkpoint stores weight-normed convolutions (`weight_g`, `weight_v`); they are folded into
plain weights at load time, as upstream does with `remove_weight_norm()` before inference.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tts.config import CODEC_FRAME_SAMPLES, CODEC_LATENT_DIM, GLOBAL_FEATURE_DIM, CodecConfig
from tts.weights import WeightMismatchError, fold_weight_norm, load_strict, read_checkpoint

LRELU_SLOPE = 0.1


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


class ResBlock1(nn.Module):
    """Three (dilated conv, conv) pairs, each a residual branch behind leaky ReLUs."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=same_padding(kernel_size, d))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=same_padding(kernel_size)) for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            x = x + conv2(F.leaky_relu(conv1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x

    def reach(self) -> int:
        """Samples on each side that can influence one output sample."""
        return sum(c1.padding[0] + c2.padding[0] for c1, c2 in zip(self.convs1, self.convs2))


class ResBlock2(nn.Module):
    """Dilated convs, each a residual branch behind a leaky ReLU."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=same_padding(kernel_size, d))
            for d in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = x + conv(F.leaky_relu(x, LRELU_SLOPE))
        return x

    def reach(self) -> int:
        return sum(conv.padding[0] for conv in self.convs)


class Generator(nn.Module):
    """Latent [B, 512, T] + style [B, 128] -> waveform [B, T * 600] in [-1, 1] (or of some frames)."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        channels = config.upsample_initial_channel
        self.num_kernels = len(config.resblock_kernel_sizes)
        self.conv_pre = nn.Conv1d(CODEC_LATENT_DIM, channels, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        resblock = ResBlock1 if config.resblock == "1" else ResBlock2
        for rate, kernel in zip(config.upsample_rates, config.upsample_kernel_sizes):
            self.ups.append(nn.ConvTranspose1d(channels, channels // 2, kernel, rate, padding=(kernel - rate) // 2))
            channels //= 2
            for size, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes):
                self.resblocks.append(resblock(channels, size, dilations))
        self.conv_post = nn.Conv1d(channels, 1, 7, padding=3)

    def stage_resblocks(self, stage: int) -> nn.ModuleList:
        """The resblocks (one per kernel size) whose mean follows upsampling stage ``stage``."""
        return self.resblocks[stage * self.num_kernels : (stage + 1) * self.num_kernels]

    def forward(self, latent: torch.Tensor, style: torch.Tensor, keep: tuple[int, int] | None = None) -> torch.Tensor:
        """The waveform of frames `keep` [start, stop) (default all). Each layer computes only the
        samples that reach those frames (`input_ranges`), so a window's context and look-ahead frames
        cost only the early, low-rate layers; the kept samples are the whole window's."""
        length = latent.shape[-1]
        start, stop = (0, length) if keep is None else keep
        ranges = iter(self.input_ranges(length, start, stop))
        lo, hi = next(ranges)
        x, offset = self.conv_pre(latent[..., lo:hi]), lo  # offset: x[..., 0]'s sample in this stage's rate
        for stage, up in enumerate(self.ups):
            lo, hi = next(ranges)
            x = up(F.leaky_relu(x[..., lo - offset : hi - offset], LRELU_SLOPE))
            offset = lo * up.stride[0]
            x = sum(block(x) for block in self.stage_resblocks(stage)) / self.num_kernels
            if x.shape[1] == style.shape[-1]:
                x = x + style.unsqueeze(-1)
        lo, hi = next(ranges)
        x = self.conv_post(F.leaky_relu(x[..., lo - offset : hi - offset], LRELU_SLOPE))
        first = start * CODEC_FRAME_SAMPLES - lo
        return torch.tanh(x[..., first : first + (stop - start) * CODEC_FRAME_SAMPLES]).squeeze(1)

    def input_ranges(self, length: int, start: int, stop: int) -> list[tuple[int, int]]:
        """The [lo, hi) samples each layer must be given for the audio of frames [start, stop) of a
        `length`-frame latent to equal the whole window's: of the latent (frames) for `conv_pre`, of
        each upsampling stage's input, and of `conv_post`'s input (in that layer's rate). Each range
        adds to the one after it the reach of the layers between (beyond a range, outputs change only
        outside the kept frames); all are clipped to the signal."""
        rates = [1]
        for up in self.ups:
            rates.append(rates[-1] * up.stride[0])
        post = self.conv_post.padding[0]
        lo, hi = start * CODEC_FRAME_SAMPLES - post, stop * CODEC_FRAME_SAMPLES + post
        ranges = [(max(lo, 0), min(hi, length * rates[-1]))]
        for stage in reversed(range(len(self.ups))):
            reach = max(block.reach() for block in self.stage_resblocks(stage))
            lo, hi = lo - reach, hi + reach  # the upsampled samples the resblocks need
            up = self.ups[stage]
            rate, kernel, padding = up.stride[0], up.kernel_size[0], up.padding[0]
            lo, hi = -(-(lo + padding - kernel + 1) // rate), (hi - 1 + padding) // rate + 1  # inputs reaching them
            ranges.append((max(lo, 0), min(hi, length * rates[stage])))
        pre = self.conv_pre.padding[0]
        ranges.append((max(lo - pre, 0), min(hi + pre, length)))
        return ranges[::-1]

    def receptive_field_frames(self) -> int:
        """Upper bound on the codec frames, each side, that can change one frame's audio."""
        reach = self.conv_pre.padding[0]  # in frames
        for stage, up in enumerate(self.ups):
            reach = (reach + 1) * up.stride[0] + up.kernel_size[0]  # now in this stage's samples
            reach += max(block.reach() for block in self.stage_resblocks(stage))
        reach += self.conv_post.padding[0]
        return math.ceil(reach / CODEC_FRAME_SAMPLES)


class Codebook(nn.Module):
    """One VQ codebook (upstream `Quantizer_module`); decoding is a table lookup."""

    def __init__(self, n_codes: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_codes, dim)


def residual_layer_name(layer: int) -> str:
    """Checkpoint name of residual layer ``layer``'s codebooks: `quantizer_modules`, then `quantizer_modules2`, ..."""
    return "quantizer_modules" if layer == 0 else f"quantizer_modules{layer + 1}"


class Quantizer(nn.Module):
    """Code groups x residual layers of local codebooks, plus the global (style) codebooks."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        group_dim = CODEC_LATENT_DIM // config.n_code_groups
        for layer in range(config.residul_layer):
            codebooks = nn.ModuleList(Codebook(config.n_codes, group_dim) for _ in range(config.n_code_groups))
            self.add_module(residual_layer_name(layer), codebooks)
        global_dim = GLOBAL_FEATURE_DIM // config.global_code_num
        self.quantizer_modules_globaltokens = nn.ModuleList(
            Codebook(config.n_codes, global_dim) for _ in range(config.global_code_num)
        )
        self.n_code_groups = config.n_code_groups
        self.residul_layer = config.residul_layer

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T, groups * layers] (layer-major) -> latent [B, 512, T], summed over layers."""
        latent = 0
        for layer in range(self.residul_layer):
            codebooks = getattr(self, residual_layer_name(layer))
            columns = codes[..., layer * self.n_code_groups : (layer + 1) * self.n_code_groups]
            latent = latent + torch.cat(
                [book.embedding(columns[..., g]) for g, book in enumerate(codebooks)], dim=-1
            )
        return latent.transpose(1, 2)

    def embed_global(self, tokens: torch.Tensor) -> torch.Tensor:
        """Global tokens [B, global_code_num] -> style vector [B, 128]."""
        books = self.quantizer_modules_globaltokens
        return torch.cat([book.embedding(tokens[:, j]) for j, book in enumerate(books)], dim=-1)


class TiCodec(nn.Module):
    """Codec decoder: codec tokens -> 24 kHz float audio, with the checkpoint's fixed global tokens."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.quantizer = Quantizer(config)
        self.register_buffer("global_tokens", torch.tensor([config.global_tokens]), persistent=False)

    @classmethod
    def load(cls, codec_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "TiCodec":
        """Build from `codec/model.json`; load `generator` and `quantizer` of `codec/final.pt` strictly,
        to run in `dtype`.

        The checkpoint's `encoder` (audio -> codes) is not needed to synthesise and is not loaded.
        """
        codec_dir = Path(codec_dir)
        config = CodecConfig.from_model_json(codec_dir / "model.json")
        checkpoint = read_checkpoint(codec_dir / "final.pt")
        where = codec_dir / "final.pt"
        for part in ("generator", "quantizer"):
            if part not in checkpoint:
                raise WeightMismatchError(f"{where}: no '{part}' state dict (found {sorted(checkpoint)})")
        model = cls(config)
        load_strict(model.generator, fold_weight_norm(checkpoint["generator"]), where=f"{where} [generator]")
        load_strict(model.quantizer, checkpoint["quantizer"], where=f"{where} [quantizer]")
        return model.to(device=device, dtype=dtype).eval()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, keep: tuple[int, int] | None = None) -> torch.Tensor:
        """codes [B, T] (one code per frame) or [B, T, codes_per_frame] -> audio [B, T * 600], or of the
        frames `keep` [start, stop) only: [B, (stop - start) * 600], the same samples, computed for less."""
        if codes.dim() == 2:
            codes = codes.unsqueeze(-1)
        if codes.shape[-1] != self.config.codes_per_frame:
            raise ValueError(f"expected {self.config.codes_per_frame} codes per frame, got {codes.shape[-1]}")
        if keep is not None and not 0 <= keep[0] < keep[1] <= codes.shape[1]:
            raise ValueError(f"keep {keep} is not a range of the {codes.shape[1]} frames")
        codes = codes.to(self.global_tokens.device)
        style = self.quantizer.embed_global(self.global_tokens.expand(codes.shape[0], -1))
        return self.generator(self.quantizer.embed(codes), style, keep)
