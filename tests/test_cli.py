"""vita-server settings from flags and the environment."""

import os

import pytest
import torch
from torch import nn

from server.cli import configure_cpu, parse_args
from server.settings import ServerSettings
from tts.codec import TiCodec
from tts.codec_windows import window_lengths
from tts.synthesizer import CHUNK_SIZE, FIRST_SENTENCE_CHUNK_SIZE, PADDING
from tts.tiny_checkpoint import full_size_codec_config


def test_cpu_threads_default_to_one_and_follow_the_flag_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerSettings(**parse_args([])).cpu_threads == 1
    assert ServerSettings(**parse_args(["--cpu-threads", "3"])).cpu_threads == 3
    monkeypatch.setenv("VITA_CPU_THREADS", "2")
    assert ServerSettings(**parse_args([])).cpu_threads == 2
    with pytest.raises(ValueError):
        ServerSettings(**parse_args(["--cpu-threads", "0"]))


def test_the_worker_runs_in_a_process_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerSettings(**parse_args([])).worker_process is True
    assert ServerSettings(**parse_args(["--no-worker-process"])).worker_process is False
    monkeypatch.setenv("VITA_WORKER_PROCESS", "false")
    assert ServerSettings(**parse_args([])).worker_process is False
    assert ServerSettings(**parse_args(["--worker-process"])).worker_process is True  # the flag wins


def test_on_the_cpu_onednn_keeps_a_primitive_per_codec_convolution_and_window_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each codec convolution meets every window length, each with up to three kept ranges (the whole
    window, after its context, a first or middle window's chunk); a user's own setting is kept."""
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # not this test process's threads
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")  # restored to what it was after the test
    configure_cpu(ServerSettings(**parse_args(["--device", "cpu"])))
    with torch.device("meta"):
        codec = TiCodec(full_size_codec_config())
    convolutions = sum(isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)) for module in codec.modules())
    lengths = window_lengths((FIRST_SENTENCE_CHUNK_SIZE, CHUNK_SIZE), PADDING)[0]
    assert int(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]) >= convolutions * len(lengths) * 3
    assert threads == [1]
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")
    configure_cpu(ServerSettings(**parse_args(["--device", "cpu"])))
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "4096"
