"""Streaming speech synthesis: LLM embeddings -> codec tokens -> 24 kHz int16 segments.

Chunking follows upstream `llm2TTS.run`: once `codec_chunk_size` new tokens plus `padding`
look-ahead tokens exist, the codec decodes them together with up to `padding` earlier tokens
and only the audio of the new chunk is kept; the rest is decoded when the decoder stops.
Concatenated segments equal a one-shot decode of all tokens exactly when `padding` covers the
codec's receptive field (`TiCodec.generator.receptive_field_frames()`); with less, samples
near chunk boundaries differ slightly, which upstream accepts for latency.

Upstream also re-cuts the audio at quiet points (`find_min_sum_index`) because its web demo
plays each segment as a separate clip; the samples are the same, so this streams plain chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tts.batch import DecoderBatch
from tts.codec import TiCodec
from tts.config import CODEC_FRAME_SAMPLES, SAMPLE_RATE
from tts.decoder import LLM2TTSCodecAR

FIRST_SENTENCE_CHUNK_SIZE = 20  # upstream: codec chunk of a reply's first sentence
CHUNK_SIZE = 40  # upstream: codec chunk of later sentences
PADDING = 10  # upstream codec_padding_size
TOP_K = 2  # upstream decoder_topk


def to_int16(audio: torch.Tensor) -> np.ndarray:
    """Float audio in [-1, 1] -> int16 (scaled by 32767, rounded, clipped)."""
    scaled = (audio.float().cpu().numpy() * 32767.0).round()
    return np.clip(scaled, -32768, 32767).astype(np.int16)


class Synthesizer:
    """VITA-1.5 TTS. Each `synthesize` call is an independent stream; streams interleaved from one
    thread share their decoder steps (`DecoderBatch`)."""

    sample_rate = SAMPLE_RATE

    def __init__(self, decoder: LLM2TTSCodecAR, codec: TiCodec) -> None:
        self.decoder = decoder
        self.codec = codec
        self.batch = DecoderBatch(decoder)

    @property
    def embedding_dim(self) -> int:
        return self.decoder.config.idim

    @classmethod
    def load(cls, tts_dir: Path, device: str = "cpu", dtype: torch.dtype | None = None) -> "Synthesizer":
        """Load `tts_dir/{decoder,codec}`; the decoder runs in `dtype` (default bf16 on CUDA where
        supported, as upstream, else float32), the codec in float32."""
        if dtype is None:
            cuda_bf16 = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
            dtype = torch.bfloat16 if cuda_bf16 else torch.float32
        tts_dir = Path(tts_dir)
        decoder = LLM2TTSCodecAR.load(tts_dir / "decoder", device=device, dtype=dtype)
        codec = TiCodec.load(tts_dir / "codec", device=device)
        return cls(decoder, codec)

    def plan_codec_windows(self, largest_chunk_size: int = CHUNK_SIZE, padding: int = PADDING) -> None:
        """Decode one window of every length chunked synthesis can ask for (1 to chunk + 2 * padding
        codes). On CUDA, cuDNN plans each new convolution shape on first use (50 to 137 ms per window
        length on an H100), so this keeps the planning away from the first replies."""
        for frames in range(1, largest_chunk_size + 2 * padding + 1):
            self.codec.decode(torch.zeros(1, frames, dtype=torch.long))

    def synthesize(
        self,
        embeddings: torch.Tensor,
        *,
        codec_chunk_size: int = CHUNK_SIZE,
        padding: int = PADDING,
        top_k: int = TOP_K,
        max_tokens: int = 1000,
        generator: torch.Generator | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield int16 24 kHz segments of `codec_chunk_size * 600` samples for `embeddings`
        [N, embedding_dim]; the last one holds the codes left (up to chunk + padding - 1).
        The call only queues the utterance (safe from any thread); the model runs in the thread
        that iterates. Stopping the iteration (or dropping the iterator) cancels the synthesis.
        `generator` (a CPU generator) makes the token sampling reproducible."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim or not len(embeddings):
            raise ValueError(f"embeddings must be [N >= 1, {self.embedding_dim}], got {tuple(embeddings.shape)}")
        if codec_chunk_size < 1 or padding < 0:
            raise ValueError("codec_chunk_size must be >= 1 and padding >= 0")
        tokens = self.batch.generate(embeddings, top_k=top_k, max_tokens=max_tokens, generator=generator)
        return self._segments(tokens, codec_chunk_size, padding)

    def _segments(self, tokens: Iterator[int], codec_chunk_size: int, padding: int) -> Iterator[np.ndarray]:
        codes: list[int] = []
        emitted = 0
        try:
            for token in tokens:
                codes.append(token)
                if len(codes) - emitted == codec_chunk_size + padding:
                    yield self._decode_frames(codes, emitted, emitted + codec_chunk_size, padding)
                    emitted += codec_chunk_size
        finally:
            tokens.close()  # frees the decoder slot when the consumer stops early
        if len(codes) > emitted:
            yield self._decode_frames(codes, emitted, len(codes), padding)

    def _decode_frames(self, codes: list[int], first: int, end: int, padding: int) -> np.ndarray:
        """Audio of frames [first, end), decoded with up to `padding` frames of context each side."""
        start = max(0, first - padding)
        window = torch.tensor([codes[start : end + padding]])
        audio = self.codec.decode(window)[0]
        return to_int16(audio[(first - start) * CODEC_FRAME_SAMPLES : (end - start) * CODEC_FRAME_SAMPLES])
