"""Tiny checkpoint writer and the strict checkpoint loader (good and corrupt folders)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file, save_file

from vita.checkpoint import INDEX_FILE, CheckpointError, load_model, main
from vita.config import AUDIO_ENCODER_DIR, VISION_TOWER_DIR, VitaConfig
from vita.model import VitaQwen2ForCausalLM
from vita.tiny_checkpoint import SEED, ensure_tiny_checkpoint, random_state_dict
from shared_data import AUDIO

HELLO_WAV = AUDIO / "en_hello.wav"
SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"


def file_digests(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_tiny_checkpoint_has_the_real_folder_layout(tiny_checkpoint: Path) -> None:
    files = set(file_digests(tiny_checkpoint))
    assert {
        "config.json", "generation_config.json", INDEX_FILE, SHARD_1, SHARD_2,
        "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
        f"{AUDIO_ENCODER_DIR}/train.yaml", f"{AUDIO_ENCODER_DIR}/global_cmvn", f"{AUDIO_ENCODER_DIR}/final.pt",
        f"{VISION_TOWER_DIR}/config.json",
        "vita_tts_ckpt/decoder/model.json", "vita_tts_ckpt/decoder/final.pt",
        "vita_tts_ckpt/codec/model.json", "vita_tts_ckpt/codec/final.pt",
    } <= files
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "vita-Qwen2"
    assert Path(config["mm_vision_tower"]).is_absolute()  # resolved by basename, like upstream paths
    weight_map = json.loads((tiny_checkpoint / INDEX_FILE).read_text())["weight_map"]
    for shard in (SHARD_1, SHARD_2):
        stored = load_file(tiny_checkpoint / shard)
        assert sorted(name for name, file in weight_map.items() if file == shard) == sorted(stored)


def test_audio_encoder_final_pt_and_cmvn_agree_with_the_shards(tiny_checkpoint: Path) -> None:
    from vita.whale import read_global_cmvn

    shards = {**load_file(tiny_checkpoint / SHARD_1), **load_file(tiny_checkpoint / SHARD_2)}
    final = torch.load(tiny_checkpoint / AUDIO_ENCODER_DIR / "final.pt", weights_only=True)
    assert set(final) == {name[len("model.audio_encoder."):] for name in shards if name.startswith("model.audio_encoder.")}
    for name, tensor in final.items():
        assert torch.equal(tensor, shards["model.audio_encoder." + name])
    mean, istd = read_global_cmvn(tiny_checkpoint / AUDIO_ENCODER_DIR / "global_cmvn")
    torch.testing.assert_close(mean, final["encoder.global_cmvn.mean"])
    torch.testing.assert_close(istd, final["encoder.global_cmvn.istd"])


def test_rewriting_gives_identical_bytes_and_is_cached(tiny_checkpoint: Path, tmp_path: Path) -> None:
    second = ensure_tiny_checkpoint(tmp_path)
    assert file_digests(second) == file_digests(tiny_checkpoint)
    marker = second / "config.json"
    before = marker.stat().st_mtime_ns
    assert ensure_tiny_checkpoint(tmp_path) == second
    assert marker.stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Path) -> VitaQwen2ForCausalLM:
    return load_model(tiny_checkpoint, progress=False)


def test_loaded_model_equals_the_in_memory_model(loaded: VitaQwen2ForCausalLM) -> None:
    config = VitaConfig.tiny()
    in_memory = VitaQwen2ForCausalLM(config).eval()
    in_memory.load_state_dict(random_state_dict(config, torch.Generator().manual_seed(SEED)))
    wave, rate = soundfile.read(HELLO_WAV, dtype="float32")
    assert rate == 16000
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(3))
    ids = [1, 2, -200, 3, -200, -500, 4]
    outputs = []
    for model in (in_memory, loaded):
        with torch.inference_mode():
            embeds = model.splice_embeddings(ids, model.encode_images(pixels), [model.encode_audio(wave)])
            outputs.append(model.lm_head(model.model.forward_reference(embeds[None])))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, in_memory.model.rotary_emb.inv_freq)
    assert not any(param.requires_grad for param in loaded.parameters())


def test_load_casts_floating_tensors_to_the_requested_dtype(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16, progress=False)
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # non-persistent, computed, kept


@pytest.fixture
def copied(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def rewrite_shard(folder: Path, shard: str, edit) -> None:
    tensors = load_file(folder / shard)
    edit(tensors)
    save_file(tensors, folder / shard, metadata={"format": "pt"})


def rewrite_index(folder: Path, edit) -> None:
    index = json.loads((folder / INDEX_FILE).read_text())
    edit(index["weight_map"])
    (folder / INDEX_FILE).write_text(json.dumps(index))


def shard_of(folder: Path, name: str) -> str:
    return json.loads((folder / INDEX_FILE).read_text())["weight_map"][name]


def test_stored_vocab_rows_override_the_config(copied: Path) -> None:
    rows = 900
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rewrite_shard(copied, shard_of(copied, name), lambda t, name=name: t.update({name: t[name][:rows].clone()}))
    model = load_model(copied, progress=False)
    assert model.config.llm.vocab_size == rows
    assert model.lm_head.weight.shape[0] == rows == model.model.embed_tokens.weight.shape[0]


def test_missing_shard_is_named(copied: Path) -> None:
    (copied / SHARD_2).unlink()
    with pytest.raises(CheckpointError, match=f"missing shard file .*{SHARD_2}"):
        load_model(copied, progress=False)


def test_truncated_shard_is_named(copied: Path) -> None:
    data = (copied / SHARD_1).read_bytes()
    (copied / SHARD_1).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read safetensors shard .*{SHARD_1}"):
        load_model(copied, progress=False)


def test_wrong_shape_is_named(copied: Path) -> None:
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_shard(copied, shard_of(copied, name), lambda t: t.update({name: t[name][:, :-1].clone()}))
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape \[32, 63\], the model expects \[32, 64\]"):
        load_model(copied, progress=False)


def test_unexpected_tensor_is_named(copied: Path) -> None:
    name = "model.layers.9.mlp.extra.weight"
    rewrite_shard(copied, SHARD_2, lambda t: t.update({name: torch.zeros(2)}))
    rewrite_index(copied, lambda weight_map: weight_map.update({name: SHARD_2}))
    with pytest.raises(CheckpointError, match=f"unexpected tensor.*first: {name}"):
        load_model(copied, progress=False)


def test_missing_tensor_is_named(copied: Path) -> None:
    name = "model.audio_encoder.adpter.project.bias"
    rewrite_shard(copied, shard_of(copied, name), lambda t: t.pop(name))
    rewrite_index(copied, lambda weight_map: weight_map.pop(name))
    with pytest.raises(CheckpointError, match=f"missing 1 tensor.*first: {name}"):
        load_model(copied, progress=False)


def test_tensor_listed_in_index_but_absent_from_shard_is_named(copied: Path) -> None:
    name = "model.norm.weight"
    shard = shard_of(copied, name)
    rewrite_shard(copied, shard, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"tensor {name} is listed in the index but missing from shard {shard}"):
        load_model(copied, progress=False)


def test_corrupt_config_json_is_named(copied: Path) -> None:
    (copied / "config.json").write_text('{"model_type": "vita-Qwen2",')
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_model(copied, progress=False)


def test_garbage_shard_header_is_named(copied: Path) -> None:
    data = bytearray((copied / SHARD_2).read_bytes())
    data[:16] = b"\xff" * 16
    (copied / SHARD_2).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"cannot read safetensors shard .*{SHARD_2}"):
        load_model(copied, progress=False)


def test_component_folder_found_by_basename_else_clear_error_else_override(copied: Path, tmp_path: Path) -> None:
    moved = Path(shutil.move(copied / VISION_TOWER_DIR, tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match=f"mm_vision_tower .*{VISION_TOWER_DIR}"):
        load_model(copied, progress=False)
    model = load_model(copied, vision_tower_dir=moved, progress=False)
    assert model.config.vision_tower_dir == moved
    assert model.config.audio_encoder_dir == copied / AUDIO_ENCODER_DIR


def test_check_command_reports_the_checkpoint_and_fails_on_a_bad_one(
    tiny_checkpoint: Path, copied: Path, capsys: pytest.CaptureFixture
) -> None:
    main([str(tiny_checkpoint)])
    report = capsys.readouterr().out
    weight_map = json.loads((tiny_checkpoint / INDEX_FILE).read_text())["weight_map"]
    numbers = sum(t.numel() for shard in (SHARD_1, SHARD_2) for t in load_file(tiny_checkpoint / shard).values())
    assert f"OK, {len(weight_map)} tensors in 2 shards, {numbers:,} numbers" in report
    (copied / SHARD_1).unlink()
    with pytest.raises(CheckpointError, match=SHARD_1):
        main([str(copied)])


def test_audio_features_of_loaded_model_have_the_llm_width(loaded: VitaQwen2ForCausalLM) -> None:
    wave = np.zeros(16000, dtype=np.float32)
    features = loaded.encode_audio(wave)
    assert features.shape[1] == loaded.config.llm.hidden_size and features.shape[0] > 0
