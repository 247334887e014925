"""The jsonl spool heals: a full disk, a damaged or removed checkpoint, bad lines met
while the disk is full, events without a key, and what operators do to its files
(rm, logrotate copytruncate, replacing events.jsonl). Events recorded afterwards are
never lost; whatever cannot be told apart is sent again rather than dropped."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from kmagent.spool.files import write_atomically


@pytest.fixture
def backend() -> str:
    return "jsonl"


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB filesystem to fill up (tmpfs; skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small filesystem here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory, leave: int = 0, name: str = "filler") -> None:
    """Fill the filesystem holding ``directory``, then give back ``leave`` bytes."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass  # full at this granularity; try smaller pieces
        if leave:
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)


# --- 1. write_atomically never puts a partial file in place --------------------------

def test_a_replacement_that_does_not_fit_leaves_the_old_file_whole(small_disk):
    """On a nearly full disk write() comes out short: the temp file must not be
    renamed over the good one, nor left behind."""
    target = small_disk / "checkpoint.json"
    write_atomically(target, b'{"v":1}')
    fill(small_disk, leave=8192)
    with pytest.raises(OSError) as raised:
        write_atomically(target, b"x" * 200_000)
    assert raised.value.errno == errno.ENOSPC
    assert target.read_bytes() == b'{"v":1}'
    assert sorted(p.name for p in small_disk.iterdir()) == ["checkpoint.json", "filler"]


def test_short_writes_are_continued_and_a_write_of_nothing_is_a_full_disk(
        tmp_path, monkeypatch):
    target = tmp_path / "d" / "f"
    target.parent.mkdir()
    real = os.write
    pieces = []

    def by_1000(fd: int, data: bytes) -> int:
        pieces.append(len(data))
        return real(fd, bytes(data[:1000]))
    monkeypatch.setattr(os, "write", by_1000)
    write_atomically(target, b"y" * 4500)
    assert target.read_bytes() == b"y" * 4500 and len(pieces) == 5

    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    with pytest.raises(OSError) as raised:
        write_atomically(target, b"z" * 10)
    assert raised.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"y" * 4500
    assert [p.name for p in target.parent.iterdir()] == ["f"]
