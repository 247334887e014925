"""What the handles of one spool share within a process, and how fork() treats it.

Every ``Spool`` handle works under a ``Shared``: a lock, the queue of appends waiting
for a group commit, and the backend's per-process state (SQLite: the process's one
connection to the file). Around fork() every such lock is held, so the child inherits
none half-taken, and in the child each one is marked stale: it belongs to the parent,
and the child's handles make or find their own on next use.
"""

from __future__ import annotations

import os
import signal
import threading
import weakref
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

class Shared:
    """What every handle of one spool in one process shares: the lock that serialises
    them (re-entrant, so that a thread already inside the spool, in a signal handler or
    a logging hook, is noticed instead of deadlocking on itself), the appends waiting
    for a group commit, and whether its owner is in the middle of a write."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        # Appends waiting to be written (records.Waiting). Appends and pops of a
        # deque are atomic, so queueing takes no lock; only the lock holder pops.
        self.waiting: deque[Any] = deque()
        self.busy = False  # the lock holder is inside a write or a transaction
        self.stale = False  # set in a forked child: this is the parent's
        _live.add(self)

    @contextmanager
    def held(self) -> Iterator["Shared"]:
        """The lock, marked busy while held (restored after, for a nested holder)."""
        with self.lock:
            was, self.busy = self.busy, True
            try:
                yield self
            finally:
                self.busy = was


_live: "weakref.WeakSet[Shared]" = weakref.WeakSet()

CLOSED = Shared()
"""What a closed handle holds: stale, so that a handle used again after close() makes
or finds its process's shared state afresh instead of using a closed connection."""
CLOSED.stale = True
_held_at_fork: list[threading.RLock] = []


_by_key: dict[str, Shared] = {}  # backends that share one per spool (jsonl's directory)
_by_key_lock = threading.RLock()


def shared_for(key: str) -> Shared:
    """The process's one Shared for ``key`` (made on first use, and anew after fork)."""
    if _by_key_lock._is_owned():
        return Shared()  # a signal handler interrupting this very call: its own, at once
    with _by_key_lock:
        shared = _by_key.get(key)
        if shared is None or shared.stale:
            shared = _by_key[key] = Shared()
        return shared


_fork_locks: list[Any] = []  # other module-level locks to hold across fork()
_in_child: list[Callable[[], None]] = []  # and what their modules do in the child
_mask_at_fork: set[signal.Signals] | None = None


def hold_across_fork(lock: Any, in_child: Callable[[], None] | None = None) -> None:
    """Hold ``lock`` across fork() too, taken after the registry locks and before the
    spools' (the order their users take them in); ``in_child`` runs in the child, with
    every lock still held. One hook for all, so that signals are blocked throughout."""
    _fork_locks.append(lock)
    if in_child is not None:
        _in_child.append(in_child)


def _before_fork() -> None:
    # Hold every spool's lock across fork(): then no thread is inside SQLite or in the
    # middle of a write for a spool at the instant of the fork, so the child inherits
    # no lock (SQLite's own mutexes included) held by a thread it does not have.
    # Our code never holds two spool locks at once, so taking them all cannot deadlock.
    # Signals are blocked from here to the end of the after-fork hook: a handler that
    # raises in a hook is reported and ignored by Python, and the fork goes on, so a
    # raise between taking a lock and releasing it would leave it held for good. (The
    # mask is read before it is changed, so a raise in between changes nothing.)
    global _mask_at_fork
    _mask_at_fork = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    # Each lock is listed before it is taken (a signal tripped before the mask was set
    # may still run its handler in here): one listed but not taken is skipped below.
    for lock in [_by_key_lock, *_fork_locks, *(shared.lock for shared in list(_live))]:
        _held_at_fork.append(lock)
        lock.acquire()


def _after_fork() -> None:
    while _held_at_fork:
        lock = _held_at_fork.pop()
        try:
            lock.release()
        except RuntimeError:
            pass  # listed, but the handler raised before it was taken
    global _mask_at_fork
    mask, _mask_at_fork = _mask_at_fork, None  # None: nothing blocked, nothing to undo
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _after_fork_in_child() -> None:
    # Everything shared belongs to the parent now: appends that other threads of the
    # parent had queued are the parent's to write (written here too, they would be
    # stored twice), and each handle makes or finds the child's own on its next use.
    for shared in list(_live):
        shared.waiting.clear()
        shared.stale = True
    for step in _in_child:
        step()
    _after_fork()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork,
                    after_in_child=_after_fork_in_child)
