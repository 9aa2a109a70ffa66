"""The challenge's shard format as train_gpt.py writes and reads it (ANCHORS 1.1)."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402


def header_ints(path):
    return np.fromfile(path, dtype="<i4", count=256)


def test_round_trip_and_exact_layout(tmp_path):
    tokens = np.array([1, 0, 5, 65535, 8191, 1, 2], dtype=np.int64)
    path = tmp_path / "fineweb_train_000000.bin"
    train_gpt.write_shard(path, tokens)
    header = header_ints(path)
    assert list(header[:3]) == [20240520, 1, len(tokens)] and not header[3:].any()
    assert path.stat().st_size == 1024 + 2 * len(tokens)
    assert train_gpt.read_shard_header(path) == len(tokens)
    got = train_gpt.read_shard(path)
    assert got.dtype == np.dtype("<u2") and np.array_equal(got, tokens)
    assert path.read_bytes()[1024:] == tokens.astype("<u2").tobytes()


def test_empty_shard_round_trip(tmp_path):
    path = tmp_path / "empty.bin"
    train_gpt.write_shard(path, np.array([], dtype=np.uint16))
    assert train_gpt.read_shard_header(path) == 0 and len(train_gpt.read_shard(path)) == 0


def write_raw(path, ints, payload=b""):
    header = np.zeros(256, dtype="<i4")
    header[:len(ints)] = ints
    path.write_bytes(header.tobytes() + payload)
    return path


@pytest.mark.parametrize("case, words", [
    ("bad magic", ["bad magic", "20240521"]),
    ("bad version", ["version", "2"]),
    ("truncated header", ["shorter than", "header"]),
    ("payload too short", ["header says 4 tokens", "1030 bytes"]),
    ("payload too long", ["header says 4 tokens", "1034 bytes"]),
])
def test_reader_refuses_damaged_files_naming_file_and_fault(tmp_path, case, words):
    path = tmp_path / f"shard_{case.replace(' ', '_')}.bin"
    payload = np.arange(4, dtype="<u2").tobytes()
    if case == "bad magic":
        write_raw(path, [20240521, 1, 4], payload)
    elif case == "bad version":
        write_raw(path, [20240520, 2, 4], payload)
    elif case == "truncated header":
        path.write_bytes(write_raw(path, [20240520, 1, 4], payload).read_bytes()[:500])
    elif case == "payload too short":
        write_raw(path, [20240520, 1, 4], payload[:-2])
    else:
        write_raw(path, [20240520, 1, 4], payload + b"\0\0")
    for reader in (train_gpt.read_shard_header, train_gpt.read_shard):
        with pytest.raises(train_gpt.ShardError) as err:
            reader(path)
        message = str(err.value)
        assert str(path) in message
        for word in words:
            assert word in message


@pytest.mark.parametrize("bad", [[65536], [-1], [3, 70000]])
def test_writer_refuses_ids_outside_uint16(tmp_path, bad):
    path = tmp_path / "out.bin"
    with pytest.raises(train_gpt.ShardError, match="65536"):
        train_gpt.write_shard(path, np.array([1, 2] + bad, dtype=np.int64))
    assert not path.exists()
    assert not [p for p in os.listdir(tmp_path)], "no temp file is left behind"


def test_write_replaces_atomically(tmp_path):
    path = tmp_path / "s.bin"
    train_gpt.write_shard(path, np.arange(10))
    train_gpt.write_shard(path, np.arange(3))
    assert list(train_gpt.read_shard(path)) == [0, 1, 2]
    assert os.listdir(tmp_path) == ["s.bin"]
