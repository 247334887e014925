"""The jsonl spool's files: names, limits, the checkpoint and what reads them raw."""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple

from .checkpoint import Position
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


def file_head(fd: int) -> int | None:
    """A fingerprint of a file: the CRC of its first line (None until it has one).
    With the inode it tells a file from a new one that reuses a deleted file's inode."""
    first = os.pread(fd, 4096, 0)
    end = first.find(b"\n")
    return None if end < 0 else zlib.crc32(first[:end + 1])


def active_seq(ckpt: Checkpoint, sealed: Iterable[int], active_ino: int,
               active_head: int | None) -> int:
    """The sequence number events.jsonl will be sealed under (only the shipper seals):
    the checkpoint's file if it is this one, else the next after every known file."""
    if ckpt.ino == active_ino and ckpt.head in (None, active_head):
        return ckpt.seq
    return max([s + 1 for s in sealed] + [ckpt.seq + (ckpt.ino is not None)])



def dump_line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
