"""Speech synthesis: LLM embeddings -> codec tokens -> 24 kHz int16 segments.

`Synthesizer` holds the decoder and the codec. `tts/service.py` runs many utterances at once in two
threads (decoder steps, codec windows); `synthesize` runs one in the calling thread, with the same token draws and windows
(`tts/codec_windows.py`), so for the same generator both give the same segments.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tts.batch import DecoderBatch
from tts.codec import TiCodec
from tts.codec_windows import Chunker, decode_windows, window_lengths
from tts.config import SAMPLE_RATE
from tts.decoder import LLM2TTSCodecAR

FIRST_SENTENCE_CHUNK_SIZE = 20  # upstream: codec chunk of a reply's first sentence
CHUNK_SIZE = 40  # upstream: codec chunk of later sentences
PADDING = 10  # upstream codec_padding_size
TOP_K = 2  # upstream decoder_topk


class Synthesizer:
    """VITA-1.5 TTS: the speech decoder (bf16 on CUDA) and the TiCodec vocoder (float32 unless asked)."""

    sample_rate = SAMPLE_RATE

    def __init__(self, decoder: LLM2TTSCodecAR, codec: TiCodec) -> None:
        self.decoder = decoder
        self.codec = codec

    @property
    def embedding_dim(self) -> int:
        return self.decoder.config.idim

    @classmethod
    def load(cls, tts_dir: Path, device: str = "cpu", dtype: torch.dtype | None = None,
             codec_dtype: torch.dtype = torch.float32) -> "Synthesizer":
        """Load `tts_dir/{decoder,codec}`; the decoder runs in `dtype` (default bf16 on CUDA where
        supported, as upstream, else float32), the codec in `codec_dtype`."""
        if dtype is None:
            cuda_bf16 = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
            dtype = torch.bfloat16 if cuda_bf16 else torch.float32
        tts_dir = Path(tts_dir)
        decoder = LLM2TTSCodecAR.load(tts_dir / "decoder", device=device, dtype=dtype)
        codec = TiCodec.load(tts_dir / "codec", device=device, dtype=codec_dtype)
        return cls(decoder, codec)

    def check_utterance(self, embeddings: torch.Tensor, codec_chunk_size: int, padding: int, top_k: int,
                        max_tokens: int) -> None:
        """Raise ValueError unless these are valid arguments for an utterance."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim or not len(embeddings):
            raise ValueError(f"embeddings must be [N >= 1, {self.embedding_dim}], got {tuple(embeddings.shape)}")
        if codec_chunk_size < 1 or padding < 0:
            raise ValueError("codec_chunk_size must be >= 1 and padding >= 0")
        if max_tokens < 1 or top_k < 1:
            raise ValueError("max_tokens and top_k must be at least 1")

    def plan_codec_windows(
        self, chunk_sizes: tuple[int, ...] = (FIRST_SENTENCE_CHUNK_SIZE, CHUNK_SIZE), padding: int = PADDING,
        batch_sizes: tuple[int, ...] = (1,),
    ) -> None:
        """Decode a batch of every shape chunked synthesis asks for most: each window length alone,
        and the first and middle windows' lengths at every batch size. On CUDA, cuDNN plans each new
        convolution shape on first use (60 to 100 ms per shape on an H200 with the full-size codec),
        so this keeps the planning away from the replies. Only last windows of an unplanned length
        that meet in one batch are planned later."""
        every, shared = window_lengths(chunk_sizes, padding)
        shapes = {(1, length) for length in every} | {(batch, length) for batch in batch_sizes for length in shared}
        for batch, length in sorted(shapes):
            self.codec.decode(torch.zeros(batch, length, dtype=torch.long))

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
        One utterance, computed in the iterating thread as it iterates (no CUDA graphs, no batching:
        the reference for `SpeechService`). `generator` (a CPU generator) makes the sampling reproducible."""
        self.check_utterance(embeddings, codec_chunk_size, padding, top_k, max_tokens)
        return self._segments(embeddings, Chunker(codec_chunk_size, padding), top_k, max_tokens, generator)

    def _segments(self, embeddings: torch.Tensor, chunker: Chunker, top_k: int, max_tokens: int,
                  generator: torch.Generator | None) -> Iterator[np.ndarray]:
        batch = DecoderBatch(self.decoder, slots=1, capacity=len(embeddings) + 1 + max_tokens, cuda_graphs=False)
        stream = batch.add(embeddings, top_k=top_k, max_tokens=max_tokens, generator=generator)
        while not stream.finished:
            [(_, tokens)] = batch.step()
            windows = [chunker.push(token) for token in tokens]
            if stream.finished:
                windows.append(chunker.finish())
            for window in windows:
                if window is not None:
                    [(_, segment)] = decode_windows(self.codec, [window])
                    yield segment
