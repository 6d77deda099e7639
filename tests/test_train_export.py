"""Exports and temporary files: a file or folder export appears complete and world-readable under its name, or not at
all (no *.tmp left, the previous export kept), and the tiny base leaves no temporary folder behind."""

import os
import stat
import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import training.common.export as export
from training.common.export import atomic_folder, atomic_save


def _full_disk(tensors, filename, metadata=None):
    """A save_file that writes part of the file, then finds the disk full."""
    with open(filename, "wb") as f:
        f.write(b"\x00" * 10)
    raise OSError(28, "No space left on device")


@pytest.fixture()
def strict_umask():
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_save_writes_0644_and_a_failure_keeps_the_old_file_and_leaves_no_tmp(tmp_path, monkeypatch,
                                                                                   strict_umask):
    path = tmp_path / "lora.safetensors"
    atomic_save({"a": torch.ones(2)}, path, {"k": "v"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and torch.equal(load_file(str(path))["a"], torch.ones(2))

    monkeypatch.setattr(export, "save_file", _full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"a": torch.zeros(2)}, path, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]
    assert torch.equal(load_file(str(path))["a"], torch.ones(2))


def test_atomic_folder_replaces_a_folder_whole_or_not_at_all(tmp_path, strict_umask):
    final = tmp_path / "unet"
    with atomic_folder(final) as tmp:
        assert not final.exists()  # nothing under the final name while it is written
        (tmp / "sub").mkdir()
        save_file({"w": torch.ones(1)}, str(tmp / "sub" / "model.safetensors"))
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]
    assert {p.relative_to(final).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [final, *final.rglob("*")]} \
        == {".": 0o755, "sub": 0o755, "sub/model.safetensors": 0o644, "config.json": 0o644}
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic_folder(final) as tmp:
            (tmp / "config.json").write_text('{"new": 1}')
            raise RuntimeError("disk gone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"] and (final / "config.json").read_text() == "{}"
    with atomic_folder(final) as tmp:  # a complete new export replaces the old one, nothing of it is left
        (tmp / "other.json").write_text("{}")
    assert sorted(p.name for p in final.iterdir()) == ["other.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


def test_the_tiny_base_leaves_no_temporary_folder(tmp_path, monkeypatch):
    from std_hf.base import tiny_base
    from std_hf.tiny import tokenizers, write_tokenizer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    base = tiny_base("sdxl")
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("std-")] == []  # (torch has caches)
    kept = tokenizers(write_tokenizer(tmp_path / "kept"), "sdxl")
    for gone, there in zip(base.tokenizers, kept):  # read into memory before their folder went
        assert gone("a cat!").input_ids == there("a cat!").input_ids and gone.pad_token == there.pad_token


def test_a_failed_json_or_bank_write_keeps_the_old_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    import training.std.trajectory_bank as bank
    from training.common.state import read_json, write_json

    path = tmp_path / "state.json"
    write_json(path, {"step": 1})
    with pytest.raises(ValueError):
        write_json(path, {"step": float("nan")})  # JSON has no NaN: refused half-way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"] and read_json(path) == {"step": 1}

    store = bank.TrajectoryBank(tmp_path / "bank", 2, 0.5)

    monkeypatch.setattr(bank, "save_file", _full_disk)
    with pytest.raises(OSError, match="No space"):
        store.step(None, 30, torch.zeros(4, 8, 8), {"z0": torch.zeros(4, 8, 8), "prompt_embeds": torch.zeros(77, 8),
                                                    "pooled": torch.zeros(8)}, "a cat", 5.0)
    assert not list((tmp_path / "bank").glob("*.tmp"))
