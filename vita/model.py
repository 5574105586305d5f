"""`VitaQwen2ForCausalLM`: Qwen2 + InternViT + mlp2x_gelu projector + whale audio encoder + lm_head.

Attribute names give exactly the checkpoint's keys, in its order: `model.embed_tokens`,
`model.layers.N`, `model.norm`, `model.vision_tower.vision_tower`, `model.mm_projector.{0,2}`,
`model.audio_encoder.{encoder,adpter}`, `lm_head`.

Splicing follows upstream `prepare_inputs_labels_for_multimodal`: each image placeholder
(-200) takes the features of ONE tile (256 tokens): an image split into N tiles, or a video
of N frames, is written as N `<image>` placeholders. Each audio placeholder (-500) takes all
the features of one clip.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from layers.host_copy import to_device
from vita.config import VitaConfig
from vita.intern_vit import InternViTVisionTower, build_mm_projector
from vita.qwen2 import Qwen2Model
from vita.tokenizer import AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX
from vita.whale import WhaleAudioEncoder


class VitaQwen2Model(Qwen2Model):
    """Qwen2 decoder plus the multimodal encoders that feed it."""

    def __init__(self, config: VitaConfig):
        super().__init__(config.llm)
        self.vision_tower = InternViTVisionTower(config.vision)
        self.mm_projector = build_mm_projector(config.mm_hidden_size, config.llm.hidden_size)
        self.audio_encoder = WhaleAudioEncoder(config.audio)


class VitaQwen2ForCausalLM(nn.Module):
    """The VITA-1.5 model: encoders, embedding splicing, decoder and untied `lm_head`."""

    def __init__(self, config: VitaConfig):
        super().__init__()
        self.config = config
        self.model = VitaQwen2Model(config)
        self.lm_head = nn.Linear(config.llm.hidden_size, config.llm.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def truncate_vocab(self, size: int) -> None:
        """Keep the first `size` rows of `embed_tokens` and `lm_head`.

        Upstream calls `resize_token_embeddings(len(tokenizer))` after loading, which shrinks
        VITA-1.5's padded 152064 rows to the tokenizer's 151665: ids the tokenizer cannot decode
        are never sampled.
        """
        rows = self.config.llm.vocab_size
        if not 0 < size <= rows:
            raise ValueError(f"cannot truncate a vocabulary of {rows} rows to {size}")
        embed, head = self.model.embed_tokens, self.lm_head
        embed.weight = nn.Parameter(embed.weight[:size], requires_grad=embed.weight.requires_grad)
        head.weight = nn.Parameter(head.weight[:size], requires_grad=head.weight.requires_grad)
        embed.num_embeddings = head.out_features = size
        self.config = self.config.with_vocab_size(size)
        self.model.config = self.config.llm

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised tiles `[N, 3, 448, 448]` -> projected features `[N, 256, hidden]`."""
        tower = self.model.vision_tower
        features = tower(pixels.to(device=self.device, dtype=self.dtype))
        return self.model.mm_projector(features)

    @torch.inference_mode()
    def encode_audio(self, wave_16k: np.ndarray) -> torch.Tensor:
        """16 kHz mono float waveform in [-1, 1] -> audio features `[T', hidden]`."""
        return self.model.audio_encoder.encode_waveform(wave_16k).to(self.dtype)

    @torch.inference_mode()
    def splice_embeddings(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        image_features: torch.Tensor | None = None,
        audio_features: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """Token ids with placeholders -> input embeddings `[T, hidden]`.

        The k-th -200 is replaced by `image_features[k]` (`[256, hidden]`), the k-th -500 by
        `audio_features[k]` (`[T_k, hidden]`); every feature must be used exactly once.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long).flatten().tolist()
        num_images = ids.count(IMAGE_TOKEN_INDEX)
        num_audio = ids.count(AUDIO_TOKEN_INDEX)
        available_images = 0 if image_features is None else image_features.shape[0]
        if num_images != available_images or num_audio != len(audio_features):
            raise ValueError(
                f"prompt has {num_images} image and {num_audio} audio placeholders, "
                f"got {available_images} image tiles and {len(audio_features)} audio clips"
            )
        images, audios = iter(image_features if image_features is not None else ()), iter(audio_features)
        pieces: list[torch.Tensor] = []
        text_run: list[int] = []
        for token_id in ids + [None]:
            if token_id is not None and token_id >= 0:
                text_run.append(token_id)
                continue
            if text_run:
                pieces.append(self.model.embed_tokens(to_device(text_run, self.device)))
                text_run = []
            if token_id == IMAGE_TOKEN_INDEX:
                pieces.append(next(images).to(self.dtype))
            elif token_id == AUDIO_TOKEN_INDEX:
                pieces.append(next(audios).to(self.dtype))
            elif token_id is not None:
                raise ValueError(f"unknown placeholder id {token_id}")
        return torch.cat(pieces, dim=0)
