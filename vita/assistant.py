"""`VitaAssistant`: the loaded VITA-1.5 model with its tokenizer, turn building and engine factory.

A turn is the user's speech (16 kHz), optional camera frames and optional text. Frames are
attached as a short video of `VIDEO_FRAMES` (4, as upstream: evenly spaced, repeated when fewer
arrived), one 448 px tile (256 tokens) each, before the audio in the user message; a first turn
with frames opens the conversation with VITA's video system prompt (`vita.prompt.Conversation`).
Media are encoded by `vita.media_encoder` (batched across turns by its `MediaEncoder` in the
server, one turn at a time here).

Through an engine, a conversation's system block is an engine prefix: prefilled once per
distinct system prompt (the engine keeps the few most recently used) and copied into each new
session, so the first turn only brings the tokens after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from layers.host_copy import to_device
from tts.config import TTS_DIR, DecoderConfig
from vita.checkpoint import default_dtype, load_model
from vita.config import VitaConfig
from vita.engine import Engine
from vita.media_encoder import MediaRequest, TurnMedia, encode_turn_media
from vita.model import VitaQwen2ForCausalLM
from vita.prompt import Conversation, system_block, user_content
from vita.tokenizer import VitaTokenizer

TTS_DECODER_CONFIG = Path(TTS_DIR) / "decoder" / "model.json"


class SystemPromptTooLong(ValueError):
    """A conversation's system prompt alone does not fit the engine's context: no turn can be answered."""


class EngineTurn(NamedTuple):
    """A turn as `Engine.generate` takes it: embeddings of the new tokens and the prefix to start from."""

    embeds: torch.Tensor  # [T, hidden]
    prefix: str | None  # key of the engine prefix (a first turn's system block), else None


@dataclass
class VitaAssistant:
    """Model + tokenizer on one device; builds each turn's new input embeddings."""

    model: VitaQwen2ForCausalLM
    tokenizer: VitaTokenizer
    tts_dim: int

    @property
    def config(self) -> VitaConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @classmethod
    def load(
        cls,
        checkpoint_dir: Path,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        *,
        vision_tower_dir: Path | None = None,
        audio_encoder_dir: Path | None = None,
    ) -> VitaAssistant:
        """Load model and tokenizer, keeping only the vocabulary rows the tokenizer can decode (as
        upstream does). The component folders default to those `config.json` names. The TTS
        width comes from `vita_tts_ckpt/decoder/model.json` when present, else VITA-1.5's LLM
        hidden / 4 (3584 -> 896)."""
        checkpoint_dir = Path(checkpoint_dir)
        model = load_model(
            checkpoint_dir, device, dtype or default_dtype(device),
            vision_tower_dir=vision_tower_dir, audio_encoder_dir=audio_encoder_dir,
        )
        tts_config = checkpoint_dir / TTS_DECODER_CONFIG
        if tts_config.is_file():
            tts_dim = DecoderConfig.from_model_json(tts_config).idim
        else:
            tts_dim = model.config.llm.hidden_size // 4
        tokenizer = VitaTokenizer.from_dir(checkpoint_dir)
        model.truncate_vocab(min(tokenizer.vocab_size, model.config.llm.vocab_size))
        return cls(model, tokenizer, tts_dim)

    def new_conversation(self, system_prompt: str | None = None) -> Conversation:
        """A conversation with `system_prompt`, or (None) VITA-1.5's, picked by its first turn: the
        video prompt when that turn brings frames, else the audio one."""
        return Conversation(system_prompt)

    def encode_media(self, audio_16k: np.ndarray | None = None, frames: Sequence[Image.Image] = ()) -> TurnMedia:
        """Encode one turn's audio and frames now (the server batches turns with `MediaEncoder`)."""
        return encode_turn_media(self.model, [MediaRequest(audio_16k, frames)])[0]

    def turn_embeddings(
        self,
        conv: Conversation,
        *,
        audio_16k: np.ndarray | None = None,
        frames: Sequence[Image.Image] = (),
        text: str | None = None,
    ) -> torch.Tensor:
        """Embeddings `[T, hidden]` of the turn's new tokens only (the first turn's include the
        system block); records the turn in `conv`."""
        return self._embed_turn(conv, self.encode_media(audio_16k, frames), text, skip_system_block=False)

    def engine_turn(
        self, engine: Engine, conv: Conversation, media: TurnMedia = TurnMedia(), text: str | None = None
    ) -> EngineTurn:
        """Embeddings of a turn's encoded `media` and `text` for `engine`: a first turn starts from the
        engine prefix of the conversation's system block (registered on first use, keyed by the system
        prompt it opened with) and brings only the tokens after it. `SystemPromptTooLong`, the turn
        not recorded, if that system block alone fills the engine's context."""
        first_turn = conv.turns == 0
        embeds = self._embed_turn(conv, media, text, skip_system_block=first_turn)
        if not first_turn:
            return EngineTurn(embeds, None)
        key = conv.opening_prompt
        if engine.prefix_length(key) is None:
            system = self.tokenizer.encode(system_block(key))
            if len(system) >= engine.max_len:
                conv.discard_turn()  # it never reaches the engine
                raise SystemPromptTooLong(f"the system prompt takes {len(system)} tokens with its template, and a "
                                          f"conversation's context holds {engine.max_len}: shorten it")
            engine.register_prefix(key, self.model.splice_embeddings(system))
        return EngineTurn(embeds, key)

    def _embed_turn(
        self, conv: Conversation, media: TurnMedia, text: str | None, skip_system_block: bool
    ) -> torch.Tensor:
        """Record the turn in `conv` and embed its text with the media spliced in (on a first turn
        without the system block if `skip_system_block`)."""
        if media.audio is None and not media.frame_count and not text:
            raise ValueError("a turn needs audio, frames or text")
        content = user_content(media.frame_count, audio=media.audio is not None, text=text)
        turn_text = conv.next_turn_text(content, video=media.frame_count > 0)
        if skip_system_block:
            turn_text = turn_text.removeprefix(system_block(conv.opening_prompt))
        ids = self.tokenizer.encode_with_placeholders(turn_text)
        audio_features = [media.audio] if media.audio is not None else []
        return self.model.splice_embeddings(ids, media.frames, audio_features)

    def end_reply(self, conv: Conversation, token_ids: Sequence[int]) -> None:
        """Record in `conv` the reply the engine streamed (every id it yielded, even if cancelled).

        No id means the engine dropped the whole turn (cancelled before its first token), so
        `conv` forgets the turn too.
        """
        if token_ids:
            conv.end_reply(token_ids[-1] in self.tokenizer.stop_ids)
        else:
            conv.discard_turn()

    @torch.inference_mode()
    def speech_embeddings(self, text: str, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        """LLM `embed_tokens` of `text`, reshaped `(-1, tts_dim)` for the TTS decoder; on `stream` if
        given (CUDA: the lookup then queues behind that stream's work only, not the LLM's steps)."""
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            ids = to_device(self.tokenizer.encode(text), self.device, torch.long)
            return self.model.model.embed_tokens(ids).reshape(-1, self.tts_dim)

    @property
    def speech_rows_per_token(self) -> int:
        """Rows of `speech_embeddings` per token of its text."""
        return self.model.config.llm.hidden_size // self.tts_dim

    def make_engine(self, max_sessions: int, max_len: int, **options) -> Engine:
        """A multi-session engine over this model, stopping at `<|im_end|>` / `<|endoftext|>`."""
        return Engine(
            self.model.model,
            self.model.lm_head,
            max_sessions=max_sessions,
            max_len=max_len,
            device=self.device,
            dtype=self.model.dtype,
            stop_token_ids=self.tokenizer.stop_ids,
            **options,
        )
