"""Taking a km log over from its writers without losing a line, as km_send does.

The libraries append to a query log by name: open, write one record, close. km,
km.php and kissmetrics-php take no lock, so nothing read from the file may ever be
cut out of it while they may append (the old way, read then truncate, lost what they
appended in between). Instead the importer reads the query log where it lies, and now
and then *takes it over*: renames it (atomic; the next writer creates a fresh one),
waits until it is *settled*, that is no writer can still add to it, reads the rest and
deletes it. A renamed file is settled when

- its last write is ``SETTLE_S`` old (a writer that opened it before the rename writes
  within microseconds, unless it is stopped);
- no process that this one may inspect holds it open (``/proc/<pid>/fd``: all of them
  as root, the same user's otherwise, and of those not the non-dumpable ones, such as
  php-fpm's and mod_php's workers). If a process that may write the file could not
  be inspected, its last write must be ``BLIND_SETTLE_S`` old instead;
- no writer holds its flock (kmts appends under one), which the importer then keeps
  while it reads the rest and deletes the file.

Even then, the deleted file is read once more through the descriptor still open: a
write that came between the last look and the delete is there.

Files the importer owns are named ``kmagent-taken-<ns>-<log name>``; km_send's orphans
keep their names (km ``<time>kissmetrics_<env>_sending.log``, kmts
``<time>_<hex>_kissmetrics_<env>_sending.log``, km.php ``<time>.kissmetrics_sending.log``).
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import time
from pathlib import Path

QUERY_LOG = re.compile(r"^kissmetrics(_.+)?_query\.log$")
SENDING_LOG = re.compile(r"^\d+(?:_[0-9a-f]+_|\.)?kissmetrics(_.*)?_sending\.log$")
TAKEN_LOG = re.compile(r"^kmagent-taken-(\d+)-(kissmetrics(_.+)?_query\.log)$")
SETTLE_S = 1.0
# A writer opens, appends one record and closes: between its open and its write it runs
# a few hundred instructions, so a writer that opened the file before the rename and has
# still not written after this long was stopped outright (SIGSTOP, a frozen cgroup, a
# machine swapping hard), not just descheduled. 10 s covers such stalls as far as any
# wait can, and costs little: the file is read as it grows meanwhile, only its deletion
# (and a torn last record) waits; `import` waits up to 30 s for it.
BLIND_SETTLE_S = 10.0


def query_logs(directory: Path, names: list[str]) -> list[Path]:
    return [directory / n for n in names if QUERY_LOG.match(n)]


def renamed_logs(directory: Path, names: list[str]) -> list[Path]:
    """km_send's orphans, then the files taken over, each oldest first."""
    sending = sorted((n for n in names if SENDING_LOG.match(n)),
                     key=lambda n: int(re.match(r"\d+", n).group()))
    taken = sorted((n for n in names if TAKEN_LOG.match(n)),
                   key=lambda n: int(TAKEN_LOG.match(n).group(1)))
    return [directory / n for n in sending + taken]


def take_over(path: Path) -> Path:
    """Rename a query log to a name of ours; the writers' next append creates it anew."""
    taken = path.with_name(f"kmagent-taken-{time.time_ns()}-{path.name}")
    os.rename(path, taken)
    return taken


def settled(fd: int, st: os.stat_result, settle_s: float = SETTLE_S) -> bool:
    """Whether no writer can add to the renamed file ``fd`` any more (see above). If
    so, ``fd`` holds the file's flock, until it is closed."""
    age = time.time() - st.st_mtime
    if age < settle_s:
        return False
    held = held_open(st)
    if held or (held is None and age < max(settle_s, BLIND_SETTLE_S)):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def held_open(st: os.stat_result) -> bool | None:
    """Whether another process has the file ``st`` open: True if one is seen to; None
    if none is, but a process that may write the file could not be inspected (another
    user's, or not dumpable); False if none can have it open."""
    me = str(os.getpid())
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and p != me]
    except OSError:
        return False  # no /proc: the time since the last write decides alone
    unseen = False
    for pid in pids:
        fds = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fds)
        except FileNotFoundError:
            continue  # gone
        except OSError:  # not ours to look at: it may hold the file unseen
            unseen = unseen or _may_write(pid, st)
            continue
        for name in names:
            try:
                found = os.stat(f"{fds}/{name}")
            except OSError:
                continue
            if found.st_ino == st.st_ino and found.st_dev == st.st_dev:
                return True
    return None if unseen else False


def _may_write(pid: str, st: os.stat_result) -> bool:
    """Whether process ``pid``'s file-system user or groups may write the file ``st``
    (its status is readable even when its fds are not). Root's processes count only
    for a file of root's: they may write any, but daemons of root's that log for an app
    to another user's file are not what these libraries run in."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        fsuid, fsgid = int(fields["Uid"].split()[3]), int(fields["Gid"].split()[3])
        groups = {int(g) for g in fields.get("Groups", "").split()} | {fsgid}
    except FileNotFoundError:
        return False  # gone
    except (OSError, KeyError, ValueError, IndexError):
        return True  # cannot tell: assume it may
    return (fsuid == st.st_uid or bool(st.st_mode & stat.S_IWOTH)
            or (st.st_gid in groups and bool(st.st_mode & stat.S_IWGRP)))
