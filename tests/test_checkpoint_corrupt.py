"""Truncated and corrupt checkpoint files: CheckpointReader raises a CheckpointError that names the file and
says what is wrong, when it opens the file (shards lazily, on first use), never a safetensors panic."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from services.errors import CheckpointError
from services.format.checkpoint import INDEX_FILE, CheckpointReader, CorruptCheckpointError, read_safetensors_header


def _copy(tiny_fp8, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_fp8, d)
    return d


def _weight_map(d) -> dict[str, str]:
    return json.loads((d / INDEX_FILE).read_text())["weight_map"]


def _raw_safetensors(header, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _victim(d):
    """(a tensor name, its shard, a tensor of another shard)."""
    wm = _weight_map(d)
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    other = next(n for n, f in wm.items() if f != wm[name])
    return name, wm[name], other


def _raises_naming(path, fn, *words) -> CorruptCheckpointError:
    with pytest.raises(CorruptCheckpointError) as exc:
        fn()
    message = str(exc.value)
    assert isinstance(exc.value, CheckpointError)
    assert exc.value.file == str(path) and str(path) in message and len(message.splitlines()) == 1
    for word in words:
        assert word in message, message
    return exc.value


def test_every_shard_init_model_writes_passes_the_header_checks(tiny_fp8):
    shards = sorted(set(_weight_map(tiny_fp8).values()))
    assert len(shards) > 1
    for shard in shards:
        assert read_safetensors_header(tiny_fp8 / shard)


def test_truncated_shard_named_on_first_use_and_other_shards_still_read(tiny_fp8, tmp_path):
    d = _copy(tiny_fp8, tmp_path)
    name, shard, other = _victim(d)
    path = d / shard
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    reader = CheckpointReader(d)  # lazy: opening the directory reads no shard
    assert reader.get(other).numel() > 0  # a shard untouched by the damage still reads
    _raises_naming(path, lambda: reader.get(name), "outside the file", "truncated")
    assert shard not in reader.opened_files


@pytest.mark.parametrize(
    "content,words",
    [
        (b"", ["0 bytes", "too short"]),
        (b"\x01\x02\x03", ["3 bytes", "too short"]),
        (struct.pack("<Q", 10_000) + b"{}", ["header length 10000", "past the end of the file"]),
        (struct.pack("<Q", 2**63) + b"x" * 64, ["header length", "past the end of the file"]),
        (_raw_safetensors(b"\xff\xfe not json"), ["header is not JSON"]),
        (_raw_safetensors(b'{"a": '), ["header is not JSON"]),
        (_raw_safetensors([1, 2]), ["header is a JSON list"]),
        (
            _raw_safetensors({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
            ["'t'", "data [0, 16) lies outside the file", "8 bytes"],
        ),
        (
            _raw_safetensors({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16),
            ["'t'", "12 bytes of data for shape [4] of F32"],
        ),
        (_raw_safetensors({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), ["'t'", "shape"]),
        (_raw_safetensors({"t": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, b"\0" * 8), ["data_offsets"]),
        (_raw_safetensors({"t": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), ["no dtype"]),
        (_raw_safetensors({"t": [1, 2]}), ["'t'", "not an object"]),
    ],
)
def test_corrupt_single_file_named_when_the_reader_opens(tiny_fp8, tmp_path, content, words):
    (tmp_path / "config.json").write_text((tiny_fp8 / "config.json").read_text())
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    _raises_naming(path, lambda: CheckpointReader(tmp_path), *words)


def test_random_bytes_for_a_shard(tiny_fp8, tmp_path):
    d = _copy(tiny_fp8, tmp_path)
    name, shard, _ = _victim(d)
    path = d / shard
    size = path.stat().st_size
    path.write_bytes(
        torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
    )
    _raises_naming(path, lambda: CheckpointReader(d).get(name), "not a safetensors file")


def test_shard_that_lacks_a_tensor_the_index_puts_there(tiny_fp8, tmp_path):
    d = _copy(tiny_fp8, tmp_path)
    name, shard, _ = _victim(d)
    save_file({"something.else": torch.zeros(2)}, str(d / shard))
    with pytest.raises(CheckpointError) as exc:
        CheckpointReader(d).get(name)
    assert name in str(exc.value) and shard in str(exc.value)


@pytest.mark.parametrize("index", ["not json", "[]", '{"weight_map": 5}', '{"weight_map": {"a": 7}}', '{"other": 1}'])
def test_malformed_index_named(tiny_fp8, tmp_path, index):
    d = _copy(tiny_fp8, tmp_path)
    (d / INDEX_FILE).write_text(index)
    _raises_naming(d / INDEX_FILE, lambda: CheckpointReader(d), "malformed index")


def test_engine_load_of_truncated_checkpoint_names_the_file(tiny_fp8, tmp_path):
    from services.gateway.engine import Engine

    d = _copy(tiny_fp8, tmp_path)
    _, shard, _ = _victim(d)
    path = d / shard
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as exc:
        Engine.from_dir(d)
    assert str(path) in str(exc.value)


def test_config_json_of_random_bytes_named(tiny_fp8, tmp_path):
    d = _copy(tiny_fp8, tmp_path)
    (d / "config.json").write_bytes(b"\x87\xff" + bytes(range(256)))
    _raises_naming(d / "config.json", lambda: CheckpointReader(d), "not UTF-8 text")
