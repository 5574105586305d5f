"""``vita-client FILE.wav``: stream a recording to the server at real-time pace, save the spoken reply.

The file is sent as it is (any sample rate the server accepts, mono or stereo; the server
resamples), in 20 ms PCM16 frames paced by the clock, followed by silence so the server's VAD
can close the last utterance. Reply audio of every turn is written to one 24 kHz WAV file and
per-turn timings are printed. A refused connection, a server error or a run without reply audio
exits non-zero with a one-line message (and writes no WAV when there is no audio).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import websockets

from server.protocol import OUTPUT_SAMPLE_RATE, decode_audio_segment

FRAME_MS = 20


@dataclass
class Turn:
    """What the client saw of one reply; times are client-side monotonic seconds.

    ``speech_ended_at`` is when the utterance's last voiced audio was sent, so latencies
    measured from it include the VAD hangover (the server's own timings start after it).
    """

    response_id: int
    speech_ended_at: float
    text: str = ""
    audio: list[np.ndarray] = field(default_factory=list)
    audio_arrivals: list[float] = field(default_factory=list)  # when each of `audio` arrived
    first_text_at: float | None = None
    first_audio_at: float | None = None
    done: dict[str, Any] | None = None
    interrupted: bool = False
    failed: str | None = None  # the server's error message if the reply failed
    late_segments: int = 0  # audio that arrived after response.interrupted (must stay 0)
    dropped_segments: int = 0  # segments the server did not send: the client read too slowly

    @property
    def audio_samples(self) -> int:
        return sum(len(a) for a in self.audio)

    def latency_ms(self, at: float | None) -> float | None:
        return None if at is None else round((at - self.speech_ended_at) * 1000, 1)

    def playback_gaps_s(self, jitter_s: float = 0.08) -> list[float]:
        """The silences a listener hears inside the reply: playback starts `jitter_s` after the first
        segment arrives (the web page's jitter buffer) and each later segment plays once the one
        before has ended, or when it arrives if that is later (a gap)."""
        gaps: list[float] = []
        ends_at = None
        for arrived, audio in zip(self.audio_arrivals, self.audio):
            if ends_at is None:
                ends_at = arrived + jitter_s
            elif arrived > ends_at:
                gaps.append(arrived - ends_at)
                ends_at = arrived
            ends_at += len(audio) / OUTPUT_SAMPLE_RATE
        return gaps


@dataclass
class ClientResult:
    """Every event the client received and its replies, in order."""

    events: list[dict[str, Any]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    stray_audio: int = 0  # segments for a response the client never saw start

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == event_type]

    def reply_audio(self) -> np.ndarray:
        parts = [a for turn in self.turns for a in turn.audio]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Any WAV (PCM 8/16/24/32-bit or float) -> int16 samples [N] or [N, C] and its rate.

    Read as float (PCM is scaled to [-1, 1]; float files are taken as they are), then clipped
    and scaled to int16: libsndfile's own int16 reading would truncate float samples to 0. NaN
    samples of a float file become silence, infinities full scale.
    """
    audio, sample_rate = sf.read(path, dtype="float32")
    audio = np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.round(np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16), sample_rate


def pcm_frames(audio: np.ndarray, sample_rate: int) -> list[bytes]:
    """Interleaved int16 audio [N] or [N, C] -> 20 ms PCM16 frames."""
    step = sample_rate * FRAME_MS // 1000
    data = audio.astype("<i2")
    return [data[i : i + step].tobytes() for i in range(0, len(data), step)]


class ReplyCollector:
    """Sorts the server's messages into ``ClientResult`` turns as they arrive."""

    def __init__(self, started: float, speed: float) -> None:
        self.result = ClientResult()
        self.turns: dict[int, Turn] = {}
        self._started = started
        self._speed = speed
        self._speech_ends: list[float] = []

    def all_done(self, expected_turns: int | None) -> bool:
        """Every started reply is done, interrupted or failed (and enough of them started)."""
        enough = expected_turns is None or len(self.turns) >= expected_turns
        return enough and all(t.done is not None or t.interrupted or t.failed for t in self.turns.values())

    def take(self, message: str | bytes, now: float) -> None:
        """File one server message (JSON text or audio frame) received at ``now``."""
        if isinstance(message, bytes):
            self._take_audio(message, now)
            return
        event = json.loads(message)
        self.result.events.append(event)
        kind, response_id = event["type"], event.get("response_id")
        turn = self.turns.get(response_id)
        if kind == "vad.speech_stopped":  # when the speech itself ended, on the sending clock
            self._speech_ends.append(self._started + event["audio_ms"] / 1000 / self._speed)
        elif kind == "response.started":
            turn = Turn(response_id, self._speech_ends[-1] if self._speech_ends else now)
            self.turns[response_id] = turn
            self.result.turns.append(turn)
        elif turn is None:
            return
        elif kind == "response.text.delta":
            turn.first_text_at = turn.first_text_at or now
            turn.text += event["delta"]
        elif kind == "response.done":
            turn.done = event
        elif kind == "response.interrupted":
            turn.interrupted = True
        elif kind == "response.audio.dropped":
            turn.dropped_segments += event["segments"]
        elif kind == "error":
            turn.failed = event["message"]

    def _take_audio(self, message: bytes, now: float) -> None:
        response_id, _, pcm = decode_audio_segment(message)
        turn = self.turns.get(response_id)
        if turn is None:
            self.result.stray_audio += 1
        elif turn.interrupted:
            turn.late_segments += 1
        else:
            turn.first_audio_at = turn.first_audio_at or now
            turn.audio.append(np.frombuffer(pcm, dtype="<i2"))
            turn.audio_arrivals.append(now)


async def stream_audio(
    url: str,
    audio: np.ndarray,
    sample_rate: int,
    *,
    speed: float = 1.0,
    tail_silence_s: float = 1.5,
    reply_timeout_s: float = 60.0,
    session_update: dict[str, Any] | None = None,
    expected_turns: int | None = None,
) -> ClientResult:
    """Stream ``audio`` (int16 [N] or [N, channels]) at ``speed`` x real time; collect the replies.

    After the audio and ``tail_silence_s`` of silence, waits until every started reply is done
    or interrupted (and at least ``expected_turns`` replies started) or ``reply_timeout_s`` passed.
    """
    channels = 1 if audio.ndim == 1 else audio.shape[1]
    silence = np.zeros((int(sample_rate * tail_silence_s),) + audio.shape[1:], dtype=np.int16)
    frames = pcm_frames(np.concatenate([audio, silence]), sample_rate)
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.start", "sample_rate": sample_rate, "channels": channels}))
        ready = json.loads(await ws.recv())
        if ready["type"] != "session.ready":
            return ClientResult(events=[ready])
        if session_update is not None:
            await ws.send(json.dumps({"type": "session.update", **session_update}))
        started = time.monotonic()
        collector = ReplyCollector(started, speed)
        collector.result.events.append(ready)

        async def receive() -> None:
            async for message in ws:
                collector.take(message, time.monotonic())

        receiver = asyncio.create_task(receive())
        for i, frame in enumerate(frames):
            if receiver.done():  # the server closed the connection (after a fatal error)
                break
            try:
                await ws.send(frame)
            except websockets.ConnectionClosed:
                break
            delay = started + (i + 1) * FRAME_MS / 1000 / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        deadline = time.monotonic() + reply_timeout_s
        while not collector.all_done(expected_turns) and time.monotonic() < deadline and not receiver.done():
            await asyncio.sleep(0.02)
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
    return collector.result


def timing_table(result: ClientResult) -> str:
    """Per-turn timings in ms: from the end of speech as the client sent it (VAD hangover
    included) and the server's own, from its end-of-turn decision."""
    rows = ["turn  client first text  client first audio  server first text  server first audio  audio s  state"]
    for turn in result.turns:
        server = (turn.done or {}).get("timings", {})
        state = (turn.done or {}).get("state", "unfinished")
        state = "interrupted" if turn.interrupted else "failed" if turn.failed else state
        rows.append(
            f"{turn.response_id:>4}  {turn.latency_ms(turn.first_text_at)!s:>17}  "
            f"{turn.latency_ms(turn.first_audio_at)!s:>18}  {server.get('end_of_speech_to_first_text_ms')!s:>17}  "
            f"{server.get('end_of_speech_to_first_audio_ms')!s:>18}  "
            f"{turn.audio_samples / OUTPUT_SAMPLE_RATE:7.2f}  {state}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vita-client", description=__doc__)
    parser.add_argument("wav", type=Path, help="speech recording (any rate 8-48 kHz, mono or stereo)")
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws")
    parser.add_argument("--out", type=Path, default=Path("reply.wav"), help="where the reply audio goes")
    parser.add_argument("--speed", type=float, default=1.0, help="pace relative to real time")
    parser.add_argument("--tail-silence-s", type=float, default=1.5)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="wait for replies after the file")
    parser.add_argument(
        "--settings", type=json.loads, help='session.update body, e.g. \'{"generation": {"temperature": 0}}\''
    )
    args = parser.parse_args(argv)
    try:
        audio, sample_rate = read_wav(args.wav)
    except (OSError, sf.SoundFileError) as error:
        sys.exit(f"vita-client: cannot read {args.wav}: {error}")
    try:
        result = asyncio.run(
            stream_audio(
                args.url,
                audio,
                sample_rate,
                speed=args.speed,
                tail_silence_s=args.tail_silence_s,
                reply_timeout_s=args.timeout_s,
                session_update=args.settings,
            )
        )
    except (OSError, websockets.WebSocketException) as error:
        sys.exit(f"vita-client: cannot talk to {args.url}: {error or type(error).__name__}")
    errors = result.of_type("error")
    for event in errors:
        print(f"error {event['code']}: {event['message']}")
    for turn in result.turns:
        print(f"reply {turn.response_id}: {turn.text!r}")
    print(timing_table(result))
    reply = result.reply_audio()
    if len(reply):
        sf.write(args.out, reply, OUTPUT_SAMPLE_RATE, subtype="PCM_16")
        print(f"reply audio: {args.out} ({len(reply) / OUTPUT_SAMPLE_RATE:.2f} s)")
    if errors:
        sys.exit(f"vita-client: server error {errors[0]['code']}: {errors[0]['message']}")
    if not len(reply):
        sys.exit(f"vita-client: no reply audio; {args.out} not written")


if __name__ == "__main__":
    main()
