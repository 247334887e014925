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
from kmagent.spool.jsonl import CHECKPOINT
from kmagent.spool.jsonl.layout import sealed_name

T0 = 1_700_000_000
PAD = "x" * 1000


@pytest.fixture
def backend() -> str:
    return "jsonl"


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
