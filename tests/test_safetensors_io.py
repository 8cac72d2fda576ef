"""Planned safetensors files: what we write is what the safetensors library reads."""

import json

import pytest
import torch
from safetensors import safe_open

from gpart_ds import safetensors_io as stio


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(7, generator=g),
        "c.ids": torch.arange(11, dtype=torch.int64),
        "d.weight": torch.randn(4, 4, generator=g).half(),
    }


def write_all(folder, ts, max_bytes, piece=3):
    entries = [stio.TensorEntry(n, t.dtype, tuple(t.shape)) for n, t in ts.items()]
    plans = stio.plan_files(entries, max_bytes)
    stio.create_files(folder, plans)
    with stio.RangeWriter(folder, plans) as w:
        for n, t in reversed(list(ts.items())):  # any order, any slicing
            flat = t.reshape(-1)
            for i in range(0, flat.numel(), piece):
                w.write(n, i, flat[i : i + piece])
    stio.write_index(folder, plans)
    return plans


@pytest.mark.parametrize("max_bytes,n_files", [(10**9, 1), (64, 3)])
def test_written_files_read_back_with_safetensors(tmp_path, max_bytes, n_files):
    ts = tensors()
    plans = write_all(tmp_path, ts, max_bytes)
    assert len(plans) == n_files
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if n_files == 1:
        assert names == ["model.safetensors"] and not (tmp_path / stio.INDEX_NAME).exists()
    else:
        assert names == [f"model-{i:05d}-of-{n_files:05d}.safetensors" for i in range(1, n_files + 1)]
        index = json.loads((tmp_path / stio.INDEX_NAME).read_text())
        assert set(index["weight_map"]) == set(ts)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
    seen = {}
    for f in names:
        with safe_open(str(tmp_path / f), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            for k in fh.keys():
                seen[k] = fh.get_tensor(k)
    assert seen.keys() == ts.keys()
    for k, t in ts.items():
        assert torch.equal(seen[k], t)
    # and our own reader agrees, slice by slice
    stored = stio.read_model_header(tmp_path)
    for k, t in ts.items():
        flat = t.reshape(-1)
        assert torch.equal(stio.read_elements(stored[k], 2, flat.numel() - 3), flat[2:-1])


def test_a_tensor_larger_than_the_shard_size_gets_its_own_file():
    entries = [
        stio.TensorEntry("small", torch.float32, (2,)),
        stio.TensorEntry("big", torch.float32, (100,)),
        stio.TensorEntry("small2", torch.float32, (2,)),
    ]
    plans = stio.plan_files(entries, 40)
    assert [[e.name for e in p.entries] for p in plans] == [["small"], ["big"], ["small2"]]


def test_writer_refuses_wrong_dtype_and_out_of_range(tmp_path):
    plans = stio.plan_files([stio.TensorEntry("x", torch.float32, (4,))], 10**6)
    stio.create_files(tmp_path, plans)
    with stio.RangeWriter(tmp_path, plans) as w:
        with pytest.raises(TypeError, match="x: writing torch.float16"):
            w.write("x", 0, torch.zeros(2, dtype=torch.float16))
        with pytest.raises(IndexError, match=r"x: elements \[3, 5\) outside 4"):
            w.write("x", 3, torch.zeros(2))


def test_truncated_and_garbage_files_are_named(tmp_path):
    write_all(tmp_path, tensors(), 10**9)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(stio.SafetensorsFormatError, match=r"model.safetensors: tensor .* \(truncated\?\)"):
        stio.read_header(f)
    f.write_bytes(b"\xff" * 20)
    with pytest.raises(stio.SafetensorsFormatError, match="header length"):
        stio.read_header(f)


@pytest.mark.parametrize(
    "text,value", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1024", 1024), (77, 77)]
)
def test_parse_size(text, value):
    assert stio.parse_size(text) == value


def test_parse_size_rejects_nonsense():
    with pytest.raises(ValueError, match="not a size"):
        stio.parse_size("lots")
