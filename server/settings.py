"""Server settings from environment (prefix ``VITA_``) and command-line overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class ServerSettings(BaseSettings):
    """Everything the gateway and the worker need to start; ``VITA_PORT=9000`` etc."""

    model_config = SettingsConfigDict(env_prefix="VITA_", extra="ignore")

    checkpoint: Path | None = Field(None, description="VITA-1.5 folder; None = tiny random checkpoint")
    cache_dir: Path = Field(Path.home() / ".cache" / "vita-realtime", description="tiny checkpoint cache")
    device: str = Field("auto", description="cpu, cuda, cuda:1 ...; auto = cuda when available")
    dtype: Literal["bfloat16", "float16"] | None = Field(
        None, description="VITA model dtype; None = bfloat16 on accelerators, float32 on CPU"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65_535)
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    max_sessions: int = Field(32, ge=1)
    cpu_threads: int = Field(
        1, ge=1, description="torch threads per operation on the CPU device: the worker, media and TTS threads "
        "already run at once, so more only oversubscribes the cores"
    )
    codec_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the TTS codec (vocoder); auto = bfloat16 on a CPU that computes it natively "
        "(AVX512-BF16 or AMX: 1.5 to 2 times as fast, 49 dB from float32 on the tiny codec), else float32"
    )
    vocoder_threads: int = Field(
        2, ge=1, description="threads that vocode different utterances side by side on the CPU device, each with "
        "cpu_threads per operation (the codec is most of the CPU's work; on CUDA one thread batches them instead)"
    )
    prefill_tokens_while_decoding: int = Field(
        2048, ge=16, le=16384, description="while replies are being generated, a prefill forward of new turns takes "
        "at most this many padded tokens, one forward per decoding step (smaller: the replies already running keep "
        "their pace; larger: new turns get their first token sooner)"
    )
    tts_steps_per_call: int = Field(
        1, ge=1, le=40, description="TTS decoder steps per call of its thread (CUDA: one graph, one read back); "
        "new sentences join between calls"
    )
    tts_admit_every_calls: int = Field(
        1, ge=1, le=100, description="while utterances are being spoken, new sentences are prefilled at most every "
        "this many TTS decoder calls (fewer, larger prefills; each stops every utterance's steps)"
    )
    tts_prefill_graphs: bool = Field(
        False, description="CUDA: TTS prefills replay from CUDA graphs, one per bucket of sentences and text rows "
        "(captured at start; off by default: on H200s they lowered first audio p50 at 64 clients but raised "
        "its p95, see benchmarks/README.md)"
    )
    worker_process: bool = Field(
        True, description="run the model worker in a child process, so the gateway (websockets, VAD, audio "
        "input) and the model threads do not share a GIL; False: a thread of the server process"
    )
    max_context_tokens: int = Field(8192, ge=512, description="KV cache length of one conversation")
    idle_timeout_s: float = Field(
        300.0, gt=0, description="close sessions with no speech, turn or event other than audio/video for this long"
    )
    handshake_timeout_s: float = Field(10.0, gt=0, description="close connections that send no session.start")
    outgoing_audio_limit_s: float = Field(
        20.0, gt=0, description="reply audio a slow client may have queued before segments are dropped"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated; when set, every websocket must bring one of them"
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated browser origins allowed besides the page's own; * = any"
    )
    max_connections_per_ip: int = Field(0, ge=0, description="open websockets per client address; 0 = no limit")
    worker_hang_timeout_s: float = Field(
        10.0, gt=0, description="a model worker loop that does not answer a heartbeat this long is restarted"
    )
    worker_restart_timeout_s: float = Field(
        300.0, gt=0, description="a restarted worker not ready by then makes /healthz fail (restart the process); "
        "a worker process loads the weights again, which takes about a minute with the real checkpoint on an H200"
    )
    web_dir: Path = REPO_ROOT / "web"
    log_format: Literal["json", "kv"] = "kv"
    log_level: str = "INFO"
    shutdown_grace_s: float = Field(5.0, ge=0, description="time given to open sessions on shutdown")

    @field_validator("api_keys", "allowed_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """``VITA_API_KEYS=key1,key2`` (and the same for origins) into a list."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def resolved_device(self) -> str:
        """The torch device to run on: ``auto`` picks CUDA when it is available."""
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def torch_dtype(self) -> torch.dtype | None:
        """The VITA model's torch dtype, or None for the device's default."""
        return None if self.dtype is None else getattr(torch, self.dtype)

    def codec_torch_dtype(self) -> torch.dtype:
        """The TTS codec's torch dtype on the resolved device (``auto`` resolved)."""
        if self.codec_dtype != "auto":
            return getattr(torch, self.codec_dtype)
        return torch.bfloat16 if self.resolved_device() == "cpu" and cpu_computes_bf16() else torch.float32


def cpu_computes_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has bfloat16 arithmetic in hardware (AVX512-BF16 or AMX-BF16); False where
    that cannot be read (not Linux)."""
    try:
        flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
