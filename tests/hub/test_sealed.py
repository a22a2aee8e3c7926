"""Sealed blobs: any size round-trips, any range reads back, and any tampering is caught."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from laulima.hub.sealed import BlobIntegrityError, Keyring, SealedReader, SealingFile

SEG = 1024


def _seal(path: Path, data: bytes, keyring: Keyring, pieces: int = 7) -> None:
    with open(path, "wb", buffering=0) as raw:
        sealed = SealingFile(raw, keyring, "k1", segment=SEG)
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            sealed.write(data[i : i + step])
        sealed.finish()


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG, 5 * SEG + 17])
def test_any_size_round_trips_and_any_range_reads_back(tmp_path: Path, size: int):
    keyring = Keyring(tmp_path / "keys")
    data = os.urandom(size)
    _seal(tmp_path / "b", data, keyring)
    assert size < 16 or data[:64] not in (tmp_path / "b").read_bytes()
    with SealedReader(tmp_path / "b", keyring) as r:
        assert r.size == size and r.readall() == data
        for start, length in [(0, 10), (SEG - 3, 7), (size // 2, SEG + 5), (max(size - 4, 0), 100)]:
            r.seek(start)
            assert r.read(length) == data[start : start + length]
        r.seek(0, io.SEEK_END)
        assert r.tell() == size and r.read(5) == b""


def _tamper(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    header = len(raw) - 3 * (SEG + 16) - (SEG // 2 + 16)
    if how == "flip":
        raw[header + SEG + 40] ^= 0x80
    elif how == "truncate-segment":
        del raw[-(SEG // 2 + 16) :]
    elif how == "swap":
        a = raw[header : header + SEG + 16]
        b = raw[header + SEG + 16 : header + 2 * (SEG + 16)]
        raw[header : header + 2 * (SEG + 16)] = b + a
    elif how == "header":
        raw[10] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["flip", "truncate-segment", "swap", "header"])
def test_tampering_is_detected(tmp_path: Path, how: str):
    keyring = Keyring(tmp_path / "keys")
    _seal(tmp_path / "b", os.urandom(3 * SEG + SEG // 2), keyring)
    _tamper(tmp_path / "b", how)
    with pytest.raises(BlobIntegrityError):
        with SealedReader(tmp_path / "b", keyring) as r:
            r.readall()


def test_keys_are_private_and_a_missing_key_is_explained(tmp_path: Path):
    keyring = Keyring(tmp_path / "keys")
    _seal(tmp_path / "b", b"secret weights", keyring)
    assert oct((tmp_path / "keys" / "k1.key").stat().st_mode & 0o777) == "0o600"
    (tmp_path / "keys" / "k1.key").unlink()
    with pytest.raises(BlobIntegrityError, match="key 'k1' is missing"):
        SealedReader(tmp_path / "b", Keyring(tmp_path / "keys"))
