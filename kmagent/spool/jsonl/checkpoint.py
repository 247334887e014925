"""The jsonl checkpoint: how far delivery reaches, and how to read one that is damaged.

``checkpoint.json`` is replaced whole (temp file + fsync + rename), so a torn one
means something outside kmagent wrote it: an editor, a restore, a disk that lied.
Its shape is checked field by field, and anything but the exact shape is damage.
Damage is never a reason to stop: producers read a damaged checkpoint as "nothing
settled yet" (the conservative reading: everything present counts as pending), and the
shipper keeps the damaged file aside and rebuilds from the oldest file present, sending
every line again rather than risk losing one (Kissmetrics drops the identical requests).
A checkpoint from a newer kmagent is not damage: it is refused (SpoolError).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import SpoolError

log = logging.getLogger("kmagent.spool")

CHECKPOINT = "checkpoint.json"
# 2: files are numbered for good (last_seq) and the active file is known by its inode
# and a fingerprint of its first bytes (active); version 1 is read and upgraded.
CHECKPOINT_VERSION = 2

Position = tuple[int, int]  # (file sequence number, byte offset)
# What tells a file from another that got its inode number: the CRC-32 of its first
# ``length`` bytes (its first line, or its first 4 KiB if that line is longer), and
# that length. Version 1 stored the CRC alone, of a first line within 4 KiB.
Fingerprint = tuple[int, int]


class DamagedCheckpoint(SpoolError):
    """checkpoint.json is there but holds no checkpoint this kmagent can trust."""


@dataclass
class Checkpoint:
    seq: int = 1  # the first line not settled yet: file ``seq``...
    offset: int = 0  # ...at this byte offset
    ahead: list[Position] = field(default_factory=list)  # settled lines past it
    bad_lines: int = 0
    in_flight: int = 0
    lines: dict[int, int] = field(default_factory=dict)  # seq -> lines, sealed files
    # A move begun (see moves.Moves._move): {"after": position, "from": [positions],
    # "origins": [their origins]}; None when none is under way.
    moving: dict[str, Any] | None = None
    # The highest sequence number ever given to a file: a number is never given to
    # two files, so a settled position can never be taken for a line of another file.
    last_seq: int = 0
    # (seq, inode, fingerprint) of the file last known as events.jsonl: the same
    # file, found again at a start, keeps its number; any other gets a new one. The
    # fingerprint is None while the file has no complete first line.
    active: tuple[int, int, Fingerprint | int | None] | None = None
    # When the shipper last rebuilt the checkpoint from a damaged one (Unix time).
    rebuilt_at: float | None = None
    # Read from a damaged file (producers only: the shipper rebuilds instead).
    damaged: bool = False

    @classmethod
    def load(cls, path: Path) -> "Checkpoint":
        """The checkpoint at ``path``; a fresh one if there is none. DamagedCheckpoint
        if the file holds anything but a checkpoint's exact shape; SpoolError if it is
        a newer format."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls()
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise DamagedCheckpoint(f"spool {path.parent}: {CHECKPOINT} is damaged: "
                                    f"not JSON ({str(exc)[:100]})") from None
        if isinstance(data, dict) and _is_int(data.get("v")) \
                and data["v"] > CHECKPOINT_VERSION:
            raise SpoolError(f"spool {path.parent}: format {data['v']} is newer than this "
                             f"kmagent understands ({CHECKPOINT_VERSION}); upgrade kmagent")
        problem = _shape_problem(data)
        if problem:
            raise DamagedCheckpoint(f"spool {path.parent}: {CHECKPOINT} is damaged: {problem}")
        ckpt = cls(seq=data["seq"], offset=data["offset"],
                   ahead=[(p[0], p[1]) for p in data.get("ahead", [])],
                   bad_lines=data.get("bad_lines", 0),
                   in_flight=data.get("in_flight", 0),
                   lines={int(k): v for k, v in data.get("lines", {}).items()},
                   moving=data.get("moving"), rebuilt_at=data.get("rebuilt_at"))
        if data["v"] == 1:
            # Version 1 knew file ``seq`` by its inode and the CRC of its first line
            # (None: not seen yet, or a first line over 4 KiB), and numbered a new
            # file after it.
            ino = data.get("ino")
            ckpt.last_seq = ckpt.seq if ino is not None else ckpt.seq - 1
            if ino is not None:
                ckpt.active = (ckpt.seq, ino, data.get("head"))
        else:
            ckpt.last_seq = data["last_seq"]
            active = data.get("active")
            if active is not None:
                head = active[2]
                ckpt.active = (active[0], active[1],
                               tuple(head) if isinstance(head, list) else head)
        return ckpt

    @classmethod
    def read(cls, path: Path) -> "Checkpoint":
        """The checkpoint as a producer or a reader takes it: a damaged one is read as
        nothing settled yet (``damaged`` set), until the shipper rebuilds it. Only a
        newer format raises."""
        try:
            return cls.load(path)
        except DamagedCheckpoint as exc:
            if str(path) not in _warned:
                _warned.add(str(path))
                log.warning("%s; counting every event present as pending until the "
                            "shipper rebuilds it", exc)
            return cls(damaged=True)

    def dump(self) -> bytes:
        record: dict[str, Any] = {
            "v": CHECKPOINT_VERSION, "seq": self.seq, "offset": self.offset,
            "ahead": self.ahead, "bad_lines": self.bad_lines,
            "in_flight": self.in_flight, "lines": self.lines, "moving": self.moving,
            "last_seq": self.last_seq, "active": self.active,
        }
        if self.rebuilt_at is not None:
            record["rebuilt_at"] = self.rebuilt_at
        return json.dumps(record, separators=(",", ":")).encode()

    def nothing_settled_in(self, seq: int) -> bool:
        """Whether no line of file ``seq`` is recorded as settled."""
        return (self.seq, self.offset) <= (seq, 0) and not any(p[0] == seq for p in self.ahead)


_warned: set[str] = set()  # damaged checkpoints this process has logged already


def _is_int(value: Any, minimum: int | None = None) -> bool:
    return type(value) is int and (minimum is None or value >= minimum)  # not bool


def _is_position(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_int(n, 0) for n in value)


def _is_positions(value: Any) -> bool:
    return isinstance(value, list) and all(_is_position(p) for p in value)


def _is_move(value: Any) -> bool:
    return (isinstance(value, dict) and _is_position(value.get("after"))
            and _is_positions(value.get("from")) and _is_positions(value.get("origins"))
            and len(value["from"]) == len(value["origins"]))


def _is_line_counts(value: Any) -> bool:
    return isinstance(value, dict) and all(
        key.isdigit() and key.isascii() and _is_int(count, 0) for key, count in value.items())


def _is_time(value: Any) -> bool:
    return type(value) in (int, float) and value == value and value >= 0  # not NaN


def _is_fingerprint(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and _is_int(value[0], 0) \
        and _is_int(value[1], 1)


def _is_active(value: Any) -> bool:
    # A fingerprint, or version 1's CRC alone (kept until the file is seen again).
    return isinstance(value, list) and len(value) == 3 and _is_int(value[0], 1) \
        and _is_int(value[1], 0) and (value[2] is None or _is_fingerprint(value[2])
                                      or _is_int(value[2], 0))


# Each field: whether it is required, and the test its value must pass.
_FIELDS: dict[str, tuple[bool, Any]] = {
    "v": (True, lambda v: _is_int(v, 1)),
    "seq": (True, lambda v: _is_int(v, 1)),
    "offset": (True, lambda v: _is_int(v, 0)),
    "ahead": (False, _is_positions),
    "bad_lines": (False, lambda v: _is_int(v, 0)),
    "in_flight": (False, lambda v: _is_int(v, 0)),
    "lines": (False, _is_line_counts),
    "moving": (False, lambda v: v is None or _is_move(v)),
    "rebuilt_at": (False, lambda v: v is None or _is_time(v)),
}
_FIELDS_BY_VERSION: dict[int, dict[str, tuple[bool, Any]]] = {
    1: {"ino": (False, lambda v: v is None or _is_int(v, 0)),
        "head": (False, lambda v: v is None or _is_int(v, 0))},
    2: {"last_seq": (True, lambda v: _is_int(v, 0)),
        "active": (False, lambda v: v is None or _is_active(v))},
}


def _shape_problem(data: Any) -> str | None:
    """What is wrong with a parsed checkpoint's shape, or None if nothing is."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    version = data.get("v")
    if version not in _FIELDS_BY_VERSION:
        return f"'v' is not valid: {json.dumps(version)[:80]}"
    for name, (required, valid) in {**_FIELDS, **_FIELDS_BY_VERSION[version]}.items():
        if name not in data:
            if required:
                return f"{name!r} is missing"
        elif not valid(data[name]):
            return f"{name!r} is not valid: {json.dumps(data[name])[:80]}"
    return None
