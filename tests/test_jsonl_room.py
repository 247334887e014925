"""A jsonl sealed file gives its room back as it is settled, not only once whole: a
backlog written in a burst (an outage, a stopped daemon) can sit in one file that holds
most of the disk, and settling it costs room first (dead letters, checkpoints)."""

from __future__ import annotations

import json
import os
import time

import pytest

from kmagent.events import make_event
from kmagent.spool import open_spool
from kmagent.spool.files import punch_hole
from kmagent.spool.jsonl import CHECKPOINT, JsonlSpool
from kmagent.spool.jsonl.layout import sealed_name

T0 = 1_700_000_000
PAD = "x" * 1000


pytestmark = pytest.mark.backends("jsonl")


def event(n: int):
    return make_event(f"person{n}", "Did", {"n": n, "pad": PAD}, now=T0 + n)


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def one_sealed_backlog(spool_path, count: int):
    """A shipper whose ``count`` events all sit in one sealed file (written in a burst,
    sealed at the first claim); the first file's path."""
    spool = open_spool(spool_path, backend="jsonl", rotate_bytes=4096)
    for n in range(count):
        spool.append(event(n))
    spool.claim(0, now=time.time())  # seals events.jsonl: it is past rotate_bytes
    sealed = spool_path / sealed_name(1)
    assert sealed.exists()
    return spool, sealed


def settle(spool, count: int) -> list[str]:
    """Claim and ack ``count`` events; their persons."""
    persons = []
    while len(persons) < count:
        items = spool.claim(min(256, count - len(persons)), now=time.time())
        assert items
        spool.ack([i.id for i in items])
        persons += [i.query.split("&")[0][3:] for i in items]
    return persons


def test_a_sealed_files_settled_start_is_given_back(spool_path):
    spool, sealed = one_sealed_backlog(spool_path, 3000)
    if not _can_punch(spool_path):
        pytest.skip("this filesystem cannot punch holes (fallocate PUNCH_HOLE)")
    before = allocated(sealed)
    settle(spool, 2000)
    assert allocated(sealed) < before - 1_500_000  # ~2 MB settled, at least 1.5 MB back
    rest = settle(spool, 1000)  # what follows the hole is whole
    assert rest == [f"person{n}" for n in range(2000, 3000)]
    assert not sealed.exists()  # settled whole: deleted as before
    spool.close()


def test_a_checkpoint_rebuilt_after_a_hole_loses_nothing_unsettled(spool_path):
    spool, sealed = one_sealed_backlog(spool_path, 3000)
    if not _can_punch(spool_path):
        pytest.skip("this filesystem cannot punch holes (fallocate PUNCH_HOLE)")
    settle(spool, 2000)
    spool.close()
    (spool_path / CHECKPOINT).write_bytes(b"{}")  # damaged: rebuilt from the file's start
    shipper = open_spool(spool_path, backend="jsonl")
    shipper.recover()
    again = []
    while True:
        items = shipper.claim(256, now=time.time())
        if not items:
            if shipper.next_due() is None:
                break
            continue
        shipper.ack([i.id for i in items])
        again += [i.query.split("&")[0][3:] for i in items]
    # Every unsettled event again, in order; of the settled ones, those not punched away
    # are sent again too (the host drops identical requests).
    assert again[-1000:] == [f"person{n}" for n in range(2000, 3000)]
    assert len(again) == len(set(again))
    # The hole is passed over, not kept as a bad line of megabytes of NUL bytes: at
    # most the tail of the line it cut is set aside.
    bad = (spool_path / "bad.jsonl").read_text().splitlines()
    assert len(bad) <= 1 and all(json.loads(b)["bytes"] < 4096 for b in bad)
    shipper.close()


def _can_punch(directory) -> bool:
    probe = directory / "punch-probe"
    probe.write_bytes(b"\1" * 8192)
    try:
        return punch_hole(probe, 8192) and probe.read_bytes()[:4096] == b"\0" * 4096
    finally:
        probe.unlink()


def test_dead_letters_wait_in_the_reserve_and_are_written_at_close(spool_path, monkeypatch):
    """Down in the reserve, a dead letter behind an event that keeps failing waits (its
    write would spend the room the checkpoint needs); above it, or at close, it is
    written: never held for good, never sent again for want of a letter."""
    spool = open_spool(spool_path, backend="jsonl")
    for n in range(3):
        spool.append(event(n))
    first, second, third = spool.claim(3, now=time.time())
    spool.retry([(first.id, time.time() + 3600, "HTTP 503")])
    in_reserve = True
    monkeypatch.setattr(JsonlSpool, "in_reserve", lambda self: in_reserve)
    spool.dead_letter([second.id], status=400, reason="HTTP 400", now=time.time())
    assert spool.dead_letters() == []  # waits: the checkpoint cannot move past `first`
    in_reserve = False
    spool.dead_letter([third.id], status=400, reason="HTTP 400", now=time.time())
    assert len(spool.dead_letters()) == 2  # room again: both written
    spool.close()

    spool = open_spool(spool_path, backend="jsonl")
    spool.append(event(3))
    spool.append(event(4))
    spool.recover()
    items = spool.claim(10, now=time.time())
    in_reserve = True
    refused = [i for i in items if "person4" in i.query]
    spool.dead_letter([i.id for i in refused], status=400, reason="HTTP 400", now=time.time())
    assert len(spool.dead_letters()) == 2
    spool.close()  # written at close, rather than sent (and refused) again next run
    assert len(open_spool(spool_path, backend="jsonl").dead_letters()) == 3
