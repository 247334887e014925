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
CHECKPOINT_VERSION = 1

Position = tuple[int, int]  # (file sequence number, byte offset)


class DamagedCheckpoint(SpoolError):
    """checkpoint.json is there but holds no checkpoint this kmagent can trust."""


@dataclass
class Checkpoint:
    seq: int = 1
    ino: int | None = None  # inode of file ``seq`` (None: not seen yet)
    head: int | None = None  # and its fingerprint (file_head)
    offset: int = 0
    ahead: list[Position] = field(default_factory=list)
    bad_lines: int = 0
    in_flight: int = 0
    lines: dict[int, int] = field(default_factory=dict)  # seq -> lines, sealed files
    # A move begun (see Shipping._move): {"after": position, "from": [positions],
    # "origins": [their origins]}; None when none is under way.
    moving: dict[str, Any] | None = None
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
        return cls(seq=data["seq"], ino=data.get("ino"), head=data.get("head"),
                   offset=data["offset"],
                   ahead=[(p[0], p[1]) for p in data.get("ahead", [])],
                   bad_lines=data.get("bad_lines", 0),
                   in_flight=data.get("in_flight", 0),
                   lines={int(k): v for k, v in data.get("lines", {}).items()},
                   moving=data.get("moving"), rebuilt_at=data.get("rebuilt_at"))

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
            "v": CHECKPOINT_VERSION, "seq": self.seq, "ino": self.ino, "head": self.head,
            "offset": self.offset,
            "ahead": self.ahead, "bad_lines": self.bad_lines,
            "in_flight": self.in_flight, "lines": self.lines, "moving": self.moving,
        }
        if self.rebuilt_at is not None:
            record["rebuilt_at"] = self.rebuilt_at
        return json.dumps(record, separators=(",", ":")).encode()


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


# Each field: whether it is required, and the test its value must pass.
_FIELDS: dict[str, tuple[bool, Any]] = {
    "v": (True, lambda v: _is_int(v, 1)),
    "seq": (True, lambda v: _is_int(v, 1)),
    "offset": (True, lambda v: _is_int(v, 0)),
    "ino": (False, lambda v: v is None or _is_int(v, 0)),
    "head": (False, lambda v: v is None or _is_int(v, 0)),
    "ahead": (False, _is_positions),
    "bad_lines": (False, lambda v: _is_int(v, 0)),
    "in_flight": (False, lambda v: _is_int(v, 0)),
    "lines": (False, _is_line_counts),
    "moving": (False, lambda v: v is None or _is_move(v)),
    "rebuilt_at": (False, lambda v: v is None or _is_time(v)),
}


def _shape_problem(data: Any) -> str | None:
    """What is wrong with a parsed checkpoint's shape, or None if nothing is."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    for name, (required, valid) in _FIELDS.items():
        if name not in data:
            if required:
                return f"{name!r} is missing"
        elif not valid(data[name]):
            return f"{name!r} is not valid: {json.dumps(data[name])[:80]}"
    return None
