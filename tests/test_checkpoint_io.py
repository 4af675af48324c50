"""Lazy checkpoint reading and the streaming safetensors writer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fuselab.modeling.checkpoint import Checkpoint, read_safetensors_header
from fuselab.modeling.writer import ShardedSafetensorsWriter, TensorSpec, parse_size
from fuselab.utils.errors import FuselabError, ModelNotFoundError


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "c.scalar": torch.tensor(2.5, dtype=torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.empty": torch.zeros(0, 4),
        "f.mask": torch.tensor([True, False, True]),
    }


def write_all(out, ts, shard_bytes):
    w = ShardedSafetensorsWriter(
        out, [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in ts.items()], shard_bytes
    )
    for k, v in ts.items():
        w.write(k, v)
    return w.finish()


def test_writer_round_trips_through_the_safetensors_library(tmp_path):
    ts = tensors()
    files = write_all(tmp_path, ts, 10**9)
    assert files == ["model.safetensors"]
    back = load_file(tmp_path / "model.safetensors")
    assert set(back) == set(ts)
    for k in ts:
        assert back[k].dtype == ts[k].dtype and torch.equal(back[k], ts[k])
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    raw = (tmp_path / "model.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0  # data section 8-byte aligned


def test_writer_shards_and_index(tmp_path):
    ts = tensors()
    files = write_all(tmp_path, ts, 100)
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())
    with Checkpoint_dir(tmp_path) as ck:
        for k, v in ts.items():
            assert torch.equal(ck.read(k), v)
            assert index["weight_map"][k] == ck.tensors[k].file.name


def Checkpoint_dir(path):
    (path / "config.json").write_text(json.dumps({"architectures": ["X"], "model_type": "x"}))
    return Checkpoint(path)


def test_writer_refuses_wrong_order_shape_and_incomplete_plans(tmp_path):
    specs = [TensorSpec("x", torch.float32, (2,)), TensorSpec("y", torch.float32, (3,))]
    w = ShardedSafetensorsWriter(tmp_path, specs)
    with pytest.raises(FuselabError, match="out of order; expected x"):
        w.write("y", torch.zeros(3))
    with pytest.raises(FuselabError, match=r"planned torch.float32 \[2\]"):
        w.write("x", torch.zeros(4))
    w.write("x", torch.zeros(2))
    with pytest.raises(FuselabError, match="tensor y was never written"):
        w.finish()
    w.abort()


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5kb") == 1500
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")


def test_checkpoint_reads_headers_only_and_converts(tmp_path):
    ts = tensors()
    save_file(ts, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with Checkpoint_dir(tmp_path) as ck:
        assert ck.format == "safetensors" and set(ck.tensors) == set(ts)
        assert ck.tensors["a.weight"].shape == (7, 5) and ck.tensors["b.bias"].dtype == torch.bfloat16
        assert ck.num_parameters() == sum(v.numel() for v in ts.values())
        assert ck.read("b.bias", dtype=torch.float32).dtype == torch.float32
        torch.testing.assert_close(ck.read("b.bias", dtype=torch.float32), ts["b.bias"].float())


def test_checkpoint_bin_uses_the_safe_loader(tmp_path):
    torch.save({"w": torch.ones(2, 2)}, tmp_path / "pytorch_model.bin")
    with Checkpoint_dir(tmp_path) as ck:
        assert ck.format == "bin" and torch.equal(ck.read("w"), torch.ones(2, 2))

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"w": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FuselabError, match="cannot be read safely"):
        Checkpoint_dir(tmp_path)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="holds no model weights"):
        Checkpoint(tmp_path)
    save_file({"w": torch.ones(100)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-40])
    with pytest.raises(FuselabError, match="is truncated"):
        read_safetensors_header(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(
        ModelNotFoundError, match="lists shard model-00001-of-00002.safetensors, which is missing"
    ):
        Checkpoint(tmp_path)
