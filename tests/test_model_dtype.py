"""The model dtype: `--dtype` / `VITA_DTYPE` reach the loader, which casts every floating tensor
but whale's global CMVN statistics (kept float32); float16 runs a whole turn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors import safe_open

from server import worker
from server.cli import parse_args
from server.settings import ServerSettings, cpu_computes_bf16
from vita.assistant import VitaAssistant
from vita.checkpoint import INDEX_FILE, load_model
from shared_data import AUDIO

CMVN = ("model.audio_encoder.encoder.global_cmvn.mean", "model.audio_encoder.encoder.global_cmvn.istd")


def stored_tensor(checkpoint: Path, name: str) -> torch.Tensor:
    shard = json.loads((checkpoint / INDEX_FILE).read_text())["weight_map"][name]
    with safe_open(str(checkpoint / shard), framework="pt") as tensors:
        return tensors.get_tensor(name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loading_casts_to_the_dtype_but_keeps_cmvn_stats_float32(tiny_checkpoint: Path, dtype: torch.dtype) -> None:
    model = load_model(tiny_checkpoint, dtype=dtype, progress=False)
    state = model.state_dict()
    for name in CMVN:
        assert state[name].dtype == torch.float32
        stored = stored_tensor(tiny_checkpoint, name)
        assert torch.equal(state[name], stored.float())
        assert not torch.equal(stored.to(dtype).float(), stored.float())  # the cast would have rounded them
    floating = {tensor.dtype for name, tensor in state.items() if tensor.is_floating_point() and name not in CMVN}
    assert floating == {dtype} and model.dtype == dtype


def first_logits(assistant: VitaAssistant) -> torch.Tensor:
    wave, _ = soundfile.read(AUDIO / "en_hello.wav", dtype="float32")
    frames = [Image.new("RGB", (320, 240), color) for color in ("red", "blue")]
    embeds = assistant.turn_embeddings(assistant.new_conversation(), audio_16k=wave, frames=frames)
    with torch.inference_mode():
        return assistant.model.lm_head(assistant.model.model.forward_reference(embeds[None])[0, -1]).float()


def test_a_float16_turn_is_closer_to_float32_than_a_bfloat16_one(tiny_checkpoint: Path) -> None:
    reference = first_logits(VitaAssistant.load(tiny_checkpoint, dtype=torch.float32))
    error = {
        dtype: (first_logits(VitaAssistant.load(tiny_checkpoint, dtype=dtype)) - reference).abs().max().item()
        for dtype in (torch.float16, torch.bfloat16)
    }
    assert error[torch.float16] < 0.02
    assert error[torch.float16] < error[torch.bfloat16] / 4  # 11 mantissa bits against 8


def test_dtype_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerSettings().torch_dtype() is None  # the device's default: bf16 on GPU, float32 on CPU
    assert ServerSettings(**parse_args(["--dtype", "float16"])).torch_dtype() is torch.float16
    monkeypatch.setenv("VITA_DTYPE", "bfloat16")
    assert ServerSettings().torch_dtype() is torch.bfloat16
    assert ServerSettings(**parse_args(["--dtype", "float16"])).torch_dtype() is torch.float16  # the flag wins
    monkeypatch.setenv("VITA_DTYPE", "float32")
    with pytest.raises(ValidationError):
        ServerSettings()
    with pytest.raises(SystemExit):
        parse_args(["--dtype", "float32"])


async def test_the_worker_loads_the_assistant_in_the_settings_dtype(
    monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path
) -> None:
    loads: list[torch.dtype | None] = []

    def load(checkpoint: Path, device: str = "cpu", dtype: torch.dtype | None = None) -> VitaAssistant:
        loads.append(dtype)
        raise RuntimeError("stop after the load")

    monkeypatch.setattr(worker.VitaAssistant, "load", load)
    model_worker = worker.ModelWorker(ServerSettings(device="cpu", dtype="float16"), tiny_checkpoint, is_tiny=True)
    await model_worker._start_up()
    assert loads == [torch.float16]
    assert model_worker.load_error == "RuntimeError: stop after the load"


def test_codec_dtype_auto_takes_bfloat16_only_on_a_cpu_with_bf16_in_hardware(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert not cpu_computes_bf16(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cpu_computes_bf16(cpuinfo)
    assert not cpu_computes_bf16(tmp_path / "missing")

    monkeypatch.setattr("server.settings.cpu_computes_bf16", lambda: True)
    assert ServerSettings(device="cpu").codec_torch_dtype() is torch.bfloat16
    assert ServerSettings(device="cuda:0").codec_torch_dtype() is torch.float32
    monkeypatch.setattr("server.settings.cpu_computes_bf16", lambda: False)
    assert ServerSettings(device="cpu").codec_torch_dtype() is torch.float32
    flag = ServerSettings(**parse_args(["--device", "cpu", "--codec-dtype", "float16"]))
    assert flag.codec_torch_dtype() is torch.float16
