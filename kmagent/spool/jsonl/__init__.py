"""The newline-JSON spool: a directory of append-only files, a checkpoint, no database.

    <dir>/events.jsonl              the active file: producers append here
    <dir>/events.0000000007.jsonl   sealed files, in order: renamed from events.jsonl
    <dir>/checkpoint.json           how far delivery reaches (temp + fsync + rename)
    <dir>/dead.jsonl, bad.jsonl     dead letters; lines set aside as not valid events
    <dir>/shipper.lock              the one-shipper lock

Producers append one whole line per ``write()`` under an exclusive ``flock`` of the
active file, after checking (under the lock) that the file they hold is still
``events.jsonl``: the shipper seals it by ``rename`` under the same lock, never by copy
and truncate, so a producer that raced a rotation notices the new inode and reopens.
Before writing, a producer looks at the file's last byte: if a writer died mid-line,
it ends the torn fragment with a NUL and a newline (TORN_END) and starts its own line
on a fresh one, so the fragment becomes one bad line that is set aside, even one that
lacked only its newline, and nothing is glued to it. A line is only ever read whole,
newline included: a sealed file's unfinished tail is a bad line too.

The shipper reads lines in order and keeps the checkpoint: the position of the first
line not yet settled (delivered, dead-lettered or set aside), plus the settled lines
beyond it, since acknowledgements arrive out of order. So after a crash only what was
in flight is sent again. Each line's request is derived from the line alone by the
pure encoder, so a resend is byte-identical. A sealed file is deleted once the
checkpoint has moved past it. Positions are (file number, offset), and a file number
is never given to two files (the checkpoint keeps the highest given, and knows
events.jsonl by its inode and the fingerprint of its first bytes), so no position
settled in one file can ever be taken for a line of another.

A line that keeps failing is moved out of the reader's way: copied to the end of the
active file with its origin (``_o``: where it was first written), and its old copy
settled. A mark (``kmagent flush``) counts such a copy as the line it was first: before
the mark if the original was. The move is recorded in the checkpoint before the copy is
written, so one that a crash cuts short is finished by the next shipper, which looks
for the copy: the line is neither lost nor doubled.

One concept a module:

- ``line``: the line format (Event ⇄ one JSON object);
- ``layout``: the directory's files and what reads them raw;
- ``checkpoint``: the checkpoint, checked field by field (damage is read as a resend);
- ``spool``: ``JsonlSpool``, the Spool contract, in front of the parts below;
- ``active``: this process's hold on events.jsonl and its appends (short writes, seals);
- ``dead``: the dead letters (dead.jsonl under dead.lock);
- ``view``: the spool as any process sees it on disk (status, flush's marks, export);
- ``shipping``: the shipper's state, which exists only under the shipper lock, and its
  parts ``reading`` (which file is which; reading lines in order; what operators did to
  events.jsonl) and ``moves`` (lines that wait long, out of the reader's way).
"""

from .checkpoint import CHECKPOINT
from .layout import ACTIVE
from .spool import JsonlSpool

__all__ = ["ACTIVE", "CHECKPOINT", "JsonlSpool"]
