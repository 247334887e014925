"""The jsonl spool's files: names, limits, the checkpoint and what reads them raw."""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import TYPE_CHECKING, Any, Collection, NamedTuple

from .checkpoint import Fingerprint, Position
from .line import ORIGIN_KEY, origin_of

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

ACTIVE = "events.jsonl"
SEALED = re.compile(r"^events\.(\d{10})\.jsonl$")
DEAD = "dead.jsonl"
DEAD_LOCK = "dead.lock"  # the shipper appends, `kmagent dead` rewrites: one at a time
BAD = "bad.jsonl"

# How many lines the shipper reads past the first unsettled one. Bounds its memory and
# the checkpoint's size however long an outage lasts.
MAX_AHEAD = 4096
READ_CHUNK = 1 << 16
MAX_LINE_BYTES = 16 * 1024 * 1024  # longer is garbage (a valid event is far smaller)

# What a writer puts before its line when the file does not end in a newline (a writer
# killed mid-line, or a short write that could not be cut back): the NUL makes the torn
# fragment invalid JSON whatever it holds, so it is set aside as a bad line; a bare
# newline could make a whole line of an object that lacked only its newline.
TORN_END = b"\x00\n"


class ClaimId(NamedTuple):
    """What a claim hands out as ``Claimed.id``: the line and the claim's lease. Each
    claim gives its line a fresh lease, and a settle applies only while the line still
    carries it, so that late or repeated news of an older claim never touches a newer
    one. Shown as the line's position, as its dead letter is."""

    pos: Position
    lease: int

    def __str__(self) -> str:
        return f"{self.pos[0]}:{self.pos[1]}"




def sealed_name(seq: int) -> str:
    return f"events.{seq:010d}.jsonl"


def count_lines(fd: int, start: int, end: int) -> int:
    """Newlines in bytes [start, end) of a file."""
    count, offset = 0, start
    while offset < end:
        chunk = os.pread(fd, min(1 << 20, end - offset), offset)
        if not chunk:
            break
        count += chunk.count(b"\n")
        offset += len(chunk)
    return count


def copies_in(fd: int, start: int, end: int) -> tuple[list[tuple[int, Position]], int]:
    """The moved copies among the complete lines in bytes [start, end) of a file, as
    (offset, origin); and the offset just past the last complete line (where to go on
    from next time). Only lines holding ORIGIN_KEY are parsed."""
    found: list[tuple[int, Position]] = []
    offset, size = start, 1 << 20
    while offset < end:
        want = min(size, end - offset)
        chunk = os.pread(fd, want, offset)
        cut = chunk.rfind(b"\n") + 1
        if not cut:
            if len(chunk) < want or offset + want >= end:
                break  # an unfinished line
            if size < MAX_LINE_BYTES:
                size *= 4  # one line longer than the chunk
                continue
            cut = len(chunk)  # longer is garbage: as the reader, go on past it
        body = chunk[:cut]
        at = body.find(ORIGIN_KEY)
        while at >= 0:
            begin = body.rfind(b"\n", 0, at) + 1
            stop = body.find(b"\n", at) + 1 or len(body)
            origin = origin_of(body[begin:stop])
            if origin is not None:
                found.append((offset + begin, origin))
            at = body.find(ORIGIN_KEY, stop)
        offset += cut
        size = 1 << 20
    return found, offset


# How much of a file's start its fingerprint covers at most.
HEAD_BYTES = 4096


def fingerprint(fd: int) -> Fingerprint | None:
    """What tells a file from another that got its inode number: the CRC of its first
    line, or of its first HEAD_BYTES if that line is longer, with the length covered.
    None while the file holds neither (empty, or a short first line being written).
    Appends never change it, so a file keeps its fingerprint as it grows."""
    return fingerprint_of(os.pread(fd, HEAD_BYTES, 0))


def fingerprint_of(first: bytes) -> Fingerprint | None:
    """The fingerprint of a file whose first HEAD_BYTES (or all, if fewer) are ``first``."""
    end = first.find(b"\n", 0, HEAD_BYTES)
    length = end + 1 if end >= 0 else HEAD_BYTES if len(first) >= HEAD_BYTES else 0
    return (zlib.crc32(first[:length]), length) if length else None


def same_head(fd: int, stored: Fingerprint | int) -> bool:
    """Whether the file's first bytes are the ones ``stored`` was taken of (compared
    over that length only); an int is version 1's CRC of a first line within 4 KiB."""
    if isinstance(stored, int):
        now = fingerprint(fd)
        return now is not None and now[1] < HEAD_BYTES and now[0] == stored
    crc, length = stored
    first = os.pread(fd, length, 0)
    return len(first) == length and zlib.crc32(first) == crc


def active_seq(ckpt: Checkpoint, known: Collection[int], ino: int, fd: int) -> int:
    """The sequence number of the file now at events.jsonl (inode ``ino``, open as
    ``fd``): the one the checkpoint knows it by if it is the same file (the same first
    bytes; a file the checkpoint saw without a complete first line only if it has the
    same inode and nothing of it was settled; never one now shorter than the settled
    part); else a number no file ever had. ``known``: the numbers of the files present.

    The first bytes decide, not the inode: a spool copied or restored elsewhere (cp,
    rsync, a backup) has new inodes and is the same, and a new file that took a deleted
    one's inode is not. The first line is an event, with its own time and fields."""
    if ckpt.active is not None:
        seq, active_ino, head = ckpt.active
        same = (active_ino == ino and ckpt.nothing_settled_in(seq) if head is None
                else same_head(fd, head))
        if same and seq not in known \
                and not (ckpt.seq == seq and os.fstat(fd).st_size < ckpt.offset):
            return seq
    return next_seq(ckpt, known)


def next_seq(ckpt: Checkpoint, known: Collection[int]) -> int:
    """A sequence number no file ever had, after every one present."""
    return max([ckpt.last_seq, *known]) + 1


def dump_line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
