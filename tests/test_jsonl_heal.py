"""The jsonl spool heals: a full disk, a damaged or removed checkpoint, bad lines met
while the disk is full, events without a key, and what operators do to its files
(rm, logrotate copytruncate, replacing events.jsonl). Events recorded afterwards are
never lost; whatever cannot be told apart is sent again rather than dropped."""

from __future__ import annotations

import collections
import errno
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from helpers import (API_KEY, figures, fill, run_kmagent, start_daemon, status, stop,
                     wait_for)

from kmagent import Client
from kmagent.errors import SpoolError, SpoolFull
from kmagent.events import make_event
from kmagent.spool import open_spool
from kmagent.spool.files import write_atomically
from kmagent.spool.jsonl import ACTIVE, CHECKPOINT, JsonlSpool, shipping
from kmagent.spool.jsonl.line import to_line

T0 = 1_700_000_000


pytestmark = pytest.mark.backends("jsonl")


def open_jsonl(path, **options):
    return open_spool(path, backend="jsonl", **options)


def event(n: int, api_key: str | None = None, **props):
    return make_event(f"person{n}", "Did", {"n": n, **props}, api_key=api_key, now=T0 + n)


def ship_holding_back_person0(spool, delivered: collections.Counter, to_ack: list) -> None:
    """One round of a shipper to which person0's line keeps failing (HTTP 503); the
    acks of a round that failed are sent again first, as kmagent's Shipper does."""
    spool.ack(to_ack)
    to_ack.clear()
    items = spool.claim(100, now=time.time())
    stuck = [i for i in items if i.query.startswith("_p=person0&")]
    spool.retry([(i.id, time.time() + 3600, "HTTP 503") for i in stuck])
    delivered.update(persons(i for i in items if i not in stuck))
    to_ack.extend(i.id for i in items if i not in stuck)
    spool.ack(to_ack)
    to_ack.clear()


def drain(spool, *, with_key_only: bool = False, rounds: int = 10_000) -> list:
    """Claim and ack until nothing more comes; the claimed items, in order."""
    claimed = []
    for _ in range(rounds):
        items = spool.claim(256, now=time.time(), with_key_only=with_key_only)
        if not items:
            due = spool.next_due(with_key_only=with_key_only)
            if due is None or due > time.time():
                break
            continue  # a claim's worth of bad lines set aside, and more to read
        claimed += items
        spool.ack([i.id for i in items])
    return claimed


def persons(items) -> list[str]:
    return [i.query.split("&")[0][3:] for i in items]



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


# --- 2. a damaged checkpoint is a resend, never a stop -------------------------------

DAMAGED = {
    "truncated": b'{"v":1,"seq":1,"ino":12,"head":null,"off',
    "garbage": b"\x00\x00\x00\x00" * 2048,
    "empty object": b"{}",
    "a list": b"[]",
    "empty file": b"",
    "seq a string": b'{"v":1,"seq":"1","offset":0}',
    "offset negative": b'{"v":1,"seq":1,"offset":-5}',
    "offset missing": b'{"v":1,"seq":1}',
    "ahead not positions": b'{"v":1,"seq":1,"offset":0,"ahead":[[1]]}',
    "lines not counts": b'{"v":1,"seq":1,"offset":0,"lines":{"x":1}}',
    "moving not a move": b'{"v":1,"seq":1,"offset":0,"moving":{"after":3}}',
    "v a string": b'{"v":"1","seq":1,"offset":0}',
    "bool for int": b'{"v":1,"seq":true,"offset":0}',
}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_a_damaged_checkpoint_never_stops_producers_and_the_shipper_resends(
        spool_path, damage):
    shipper = open_jsonl(spool_path)
    for n in range(5):
        shipper.append(event(n))
    assert len(drain(shipper)) == 5  # delivered, checkpointed
    shipper.close()
    producer = Client(spool=spool_path)  # open before the damage, as an app's is
    (spool_path / CHECKPOINT).write_bytes(DAMAGED[damage])
    producer.record("late", "After The Damage")  # reads the checkpoint (max_bytes)
    producer.close()
    reader = open_jsonl(spool_path, max_bytes=1 << 30)
    assert reader.stats(time.time())["pending"] == 6  # nothing counted as settled
    assert reader.size_on_disk() > 0
    reader.append(event(5))
    reader.close()

    shipper = open_jsonl(spool_path)
    shipper.recover()
    again = drain(shipper)
    assert persons(again) == [f"person{n}" for n in range(5)] + ["late", "person5"]
    [kept] = spool_path.glob(CHECKPOINT + ".damaged-*")
    assert kept.read_bytes() == DAMAGED[damage]  # kept aside, never deleted
    figures = shipper.stats(time.time())
    assert figures["pending"] == 0 and figures["checkpoint_rebuilt_at"] > time.time() - 60
    shipper.close()
    json.loads((spool_path / CHECKPOINT).read_bytes())  # a good one in its place


def test_a_damaged_checkpoint_with_real_commands(host, write_config, spool_path):
    config = write_config(host)
    client = Client(config=config)
    for n in range(20):
        client.record(f"p{n}", "Before")
    assert run_kmagent("flush", "--timeout", "30", "--config", str(config)).returncode == 0
    (spool_path / CHECKPOINT).write_bytes(b'{"v":1,"seq":1,"offset":40')  # torn
    client.record("p20", "After")  # the open client goes on
    shown = run_kmagent("status", "--json", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["pending"] == 21
    flushed = run_kmagent("flush", "--timeout", "30", "--config", str(config))
    assert flushed.returncode == 0, flushed.stderr
    assert "damaged" in flushed.stderr and CHECKPOINT + ".damaged-" in flushed.stderr
    names = [dict(r.params)["_p"] for r in host.delivered()]
    assert sorted(names) == sorted([f"p{n}" for n in range(20)] * 2 + ["p20"])
    figures = status(config)
    assert figures["pending"] == 0 and figures["checkpoint_rebuilt_at"] is not None


def test_a_newer_checkpoint_is_refused_not_rebuilt(spool_path):
    spool_path.mkdir(parents=True)
    (spool_path / CHECKPOINT).write_text('{"v": 99, "seq": "anything"}')
    with pytest.raises(SpoolError, match="newer"):
        open_jsonl(spool_path)
    assert not list(spool_path.glob(CHECKPOINT + ".damaged-*"))


def test_a_removed_checkpoint_is_a_resend_and_nothing_later_is_lost(spool_path):
    shipper = open_jsonl(spool_path, rotate_bytes=4096)
    for n in range(30):
        shipper.append(event(n, pad="x" * 300))
    drain(shipper)  # rotates along the way
    for n in range(30, 40):
        shipper.append(event(n, pad="x" * 300))
    shipper.close()
    (spool_path / CHECKPOINT).unlink()
    for n in range(40, 45):
        Client(spool=spool_path).record(f"person{n}", "Did")
    shipper = open_jsonl(spool_path, rotate_bytes=4096)
    shipper.recover()
    got = persons(drain(shipper))
    assert {f"person{n}" for n in range(30, 45)} <= set(got)
    assert len(got) == len(set(got))
    assert shipper.stats(time.time())["pending"] == 0
    shipper.close()


# --- 3. a bad line met while the disk is full is set aside later, never wedges -------

def test_a_bad_line_met_on_a_full_disk_is_set_aside_once_there_is_room(small_disk):
    path = small_disk / "spool"
    spool = open_jsonl(path, keep_free=0)
    spool.append(event(0))
    with open(path / ACTIVE, "ab") as fh:
        fh.write(b"not an event\n")
    for n in range(1, 6001):
        spool.append(event(n))
    fill(small_disk)  # another program takes the last byte
    failed = 0
    for _ in range(5):
        try:
            drain(spool)
        except SpoolError:
            failed += 1
    assert failed  # bad.jsonl (or the checkpoint) could not be written
    os.unlink(small_disk / "filler")
    delivered = persons(drain(spool))
    assert len(set(delivered) & {f"person{n}" for n in range(1, 6001)}) == 6000
    figures = spool.stats(time.time())
    assert (figures["pending"], figures["bad_lines"]) == (0, 1)
    [aside] = (path / "bad.jsonl").read_text().splitlines()
    assert json.loads(aside)["line"] == "not an event\n"
    spool.close()


# --- 4. events without a key wait without holding back those that have one ----------

def test_one_keyless_event_does_not_stop_six_thousand_keyed_ones(spool_path):
    spool = open_jsonl(spool_path)
    spool.append(event(0))  # no key of its own, and the agent has none
    for n in range(1, 6001):
        spool.append(event(n, api_key="own"))
    delivered = persons(drain(spool, with_key_only=True))
    assert sorted(delivered) == sorted(f"person{n}" for n in range(1, 6001))
    assert spool.stats(time.time())["pending"] == 1
    assert persons(drain(spool)) == ["person0"]  # a key configured: it goes too
    assert spool.stats(time.time())["pending"] == 0
    spool.close()


def test_keyless_events_interleaved_wait_and_go_once_a_key_is_configured(spool_path):
    # Past the read-ahead (4,096), over four files: half of what it was, at half the size.
    spool = open_jsonl(spool_path, rotate_bytes=128 * 1024)
    keyless = {f"person{n}" for n in range(0, 5050, 101)}
    for n in range(5050):
        spool.append(event(n, api_key=None if f"person{n}" in keyless else "own"))
    delivered = persons(drain(spool, with_key_only=True))
    assert len(delivered) == 5000 and not keyless & set(delivered)
    assert spool.stats(time.time())["pending"] == 50
    assert len(list(spool_path.glob("events.0*.jsonl"))) <= 2  # sealed files deleted
    later = persons(drain(spool))
    assert sorted(later) == sorted(keyless)
    assert spool.stats(time.time())["pending"] == 0
    spool.close()


def test_past_half_the_read_ahead_keyless_events_wait_where_they_are(spool_path):
    """The documented limit: past 2,048 keyless events, nothing more is shipped until
    a key is configured; and waiting means waiting, not rewriting them in a loop."""
    spool = open_jsonl(spool_path)
    for n in range(3000):
        spool.append(event(n))
    for n in range(3000, 5000):
        spool.append(event(n, api_key="own"))
    for _ in range(50):
        drain(spool, with_key_only=True)
    size = os.path.getsize(spool_path / ACTIVE)
    for _ in range(50):
        assert drain(spool, with_key_only=True) == []
    assert os.path.getsize(spool_path / ACTIVE) == size  # no moves going round
    got = persons(drain(spool))
    assert len(got) == len(set(got)) and spool.stats(time.time())["pending"] == 0
    spool.close()


def test_an_outage_rewrites_nothing(spool_path):
    """Every event failing (the host down): moving the oldest out of the way would
    free nothing, so nothing is moved, and the files stay as they are."""
    spool = open_jsonl(spool_path)
    for n in range(5000):
        spool.append(event(n))
    size = os.path.getsize(spool_path / ACTIVE)
    for _ in range(40):
        items = spool.claim(300, now=time.time())
        spool.retry([(i.id, time.time() + 3600, "HTTP 503") for i in items])
    assert os.path.getsize(spool_path / ACTIVE) == size
    spool.expedite()  # the host is back
    assert len(set(persons(drain(spool)))) == 5000
    spool.close()


def test_the_daemon_without_a_key_ships_keyed_events_past_a_keyless_one(
        host, write_config, spool_path):
    config = write_config(host, api_key=None, extra="[ship]\nconcurrency = 16\n")
    Client(config=config).record("nokey", "Waits For A Key")
    keyed = Client("own-key", config=config)
    for n in range(4200):  # more than the read-ahead holds (MAX_AHEAD = 4096)
        keyed.record(f"p{n}", "Has A Key")
    keyed.close()
    daemon = start_daemon(config)
    try:
        wait_for(lambda: len(host.delivered()) >= 4200, timeout=60)
        # What status prints, read in-process (the last acks may still be on their way).
        wait_for(lambda: figures(config)["pending"] == 1, timeout=30)
        write_config(host)  # now with the agent's key
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: any(dict(r.params)["_p"] == "nokey" for r in host.delivered()),
                 timeout=30)
    finally:
        assert stop(daemon) == 0, daemon.log
    sent = [dict(r.params)["_p"] for r in host.delivered()]
    assert len(sent) == len(set(sent)) == 4201



# --- 5. what operators do to the files ----------------------------------------------

@pytest.fixture
def same_length_lines(monkeypatch):
    """Every line written at the same instant: lines of equal content length have equal
    length, so positions in one file fall on line starts in another."""
    monkeypatch.setattr(JsonlSpool, "_record", lambda self, e: to_line(e, 1700000000.25))


def delivered_persons(host) -> list[str]:
    return [dict(r.params)["_p"] for r in host.delivered()]


def spool_config(write_config, host, spool: str = "", ship: str = "max_backoff = 1\n"):
    config = write_config(host, extra="[ship]\n" + ship)
    with open(config, "a") as fh:
        fh.write(spool)
    return config


def test_rm_of_events_jsonl_then_a_restart_loses_nothing_recorded_after(
        host, write_config, spool_path, same_length_lines):
    """The checkpoint waits in an older sealed file (one event keeps failing); the
    active file is deleted by hand while the daemon runs, and the daemon restarts. The
    new events.jsonl must never take the deleted file's sequence number: the deleted
    file's settled positions would then mark the new file's lines as delivered."""
    host.answer_for = lambda target: 503 if "_p=stuck" in target else None
    config = spool_config(write_config, host, "rotate_bytes = 4096\n")
    client = Client(config=config)
    client.record("stuck", "Did", {"pad": "s" * 5000})  # alone over rotate_bytes: sealed
    daemon = start_daemon(config)
    try:
        wait_for(lambda: list(spool_path.glob("events.0*.jsonl")))
        for n in range(30):  # in one file: under rotate_bytes
            client.record(f"a{n:03d}", "Did", {"pad": "x" * 40})
        wait_for(lambda: len(host.delivered()) >= 30)
        (spool_path / ACTIVE).unlink()
        for n in range(10):
            client.record(f"b{n:03d}", "Did", {"pad": "x" * 40})
        wait_for(lambda: len(host.delivered()) >= 40)
    finally:
        assert stop(daemon) == 0, daemon.log
    for n in range(10, 150):
        client.record(f"b{n:03d}", "Did", {"pad": "x" * 40})
    daemon = start_daemon(config)
    try:
        # Until every later event is delivered, or the spool says none is pending but
        # the one that keeps failing.
        wait_for(lambda: {f"b{n:03d}" for n in range(150)} <= set(delivered_persons(host))
                 or figures(config)["pending"] <= 1, timeout=30)
        missing = {f"b{n:03d}" for n in range(150)} - set(delivered_persons(host))
        assert not missing, f"{len(missing)} of 150 later events never delivered"
        host.answer_for = None
        wait_for(lambda: figures(config)["pending"] == 0, timeout=30)
    finally:
        assert stop(daemon) == 0, daemon.log


def test_a_reused_inode_is_a_new_file_whatever_its_first_line_length(spool_path):
    """events.jsonl deleted while the daemon is down; the new file gets the same inode
    number (or is made to look so) and its first line is longer than 4 KiB."""
    first = open_jsonl(spool_path)
    first.append(event(0, pad="x" * 5000))
    for n in range(1, 100):
        first.append(event(n))
    drain(first)
    first.close()
    old_ino = os.stat(spool_path / ACTIVE).st_ino
    (spool_path / ACTIVE).unlink()
    producer = open_jsonl(spool_path)
    producer.append(event(1000, pad="y" * 6000))
    for n in range(1001, 1200):
        producer.append(event(n))
    producer.close()
    if os.stat(spool_path / ACTIVE).st_ino != old_ino:  # the filesystem chose another
        pretend_inode(spool_path, old_ino, os.stat(spool_path / ACTIVE).st_ino)
    shipper = open_jsonl(spool_path)
    shipper.recover()
    got = persons(drain(shipper))
    assert sorted(got) == sorted(f"person{n}" for n in range(1000, 1200))
    shipper.close()


def pretend_inode(spool_path, old: int, new: int) -> None:
    """Rewrite the checkpoint as if the deleted file's inode were the new one's."""
    text = (spool_path / CHECKPOINT).read_text()
    (spool_path / CHECKPOINT).write_text(text.replace(str(old), str(new)))


def test_logrotate_copytruncate_loses_nothing_recorded_after(
        host, write_config, spool_path, tmp_path):
    """Debian's logrotate with copytruncate: events.jsonl is copied, then truncated in
    place (the same inode, shorter than where the shipper had read to)."""
    logrotate = shutil.which("logrotate") or shutil.which("logrotate", path="/usr/sbin")
    if logrotate is None:
        pytest.skip("logrotate is not installed (apt-get install logrotate)")
    config = spool_config(write_config, host)
    client = Client(config=config)
    for n in range(1000):
        client.record(f"a{n:04d}", "Before Rotation")
    daemon = start_daemon(config)
    try:
        wait_for(lambda: len(host.delivered()) >= 1000, timeout=30)
        rules = tmp_path / "logrotate.conf"
        rules.write_text(f"{spool_path / ACTIVE} {{\n    copytruncate\n    rotate 1\n"
                         "    missingok\n    nocompress\n    su root root\n}\n")
        rotated = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"),
                                  str(rules)], capture_output=True, text=True, timeout=30)
        assert rotated.returncode == 0, rotated.stderr
        assert os.path.getsize(spool_path / ACTIVE) == 0
        assert (spool_path / (ACTIVE + ".1")).exists()
        for n in range(3000):
            client.record(f"b{n:04d}", "After Rotation")
        later = {f"b{n:04d}" for n in range(3000)}
        try:
            wait_for(lambda: later <= set(delivered_persons(host)), timeout=30)
        except AssertionError:
            missing = later - set(delivered_persons(host))
            raise AssertionError(f"{len(missing)} of 3,000 later events never delivered")
        wait_for(lambda: figures(config)["pending"] == 0)
    finally:
        assert stop(daemon) == 0, daemon.log


def test_operators_deleting_and_replacing_files_lose_nothing_recorded_after(
        host, write_config, spool_path, tmp_path):
    host.answer_for = lambda target: 503 if "_p=stuck" in target else None
    config = spool_config(write_config, host, "rotate_bytes = 65536\n")
    client = Client(config=config)
    expected: set[str] = set()

    def record(tag: str, count: int = 60) -> None:
        for n in range(count):
            client.record(f"{tag}{n:03d}", "Did", {"pad": "x" * 60})
            expected.add(f"{tag}{n:03d}")

    def delivered_all() -> bool:
        return expected <= set(delivered_persons(host))

    def wait_delivered(step: str, timeout: float = 20) -> None:
        try:
            wait_for(delivered_all, timeout=timeout)
        except AssertionError:
            missing = expected - set(delivered_persons(host))
            raise AssertionError(f"{step}: {len(missing)} never delivered, e.g. "
                                 f"{sorted(missing)[:5]}") from None

    def other_writer_file(tag: str) -> None:
        replacement = tmp_path / "replacement.jsonl"
        replacement.write_text("".join(
            json.dumps({"_p": f"{tag}{n:03d}", "_n": "Did", "_t": T0}) + "\n"
            for n in range(20)))
        expected.update(f"{tag}{n:03d}" for n in range(20))
        os.replace(replacement, spool_path / ACTIVE)

    client.record("stuck", "Did")  # keeps the checkpoint behind: the hard case
    record("a")
    daemon = start_daemon(config)
    try:
        wait_delivered("before")
        (spool_path / ACTIVE).unlink()  # while it runs
        record("b")
        wait_delivered("rm while running")
        other_writer_file("c")  # replaced while it runs
        record("d")
        wait_delivered("replaced while running")
        (spool_path / CHECKPOINT).unlink()
        record("e")
        wait_delivered("checkpoint removed while running")
    finally:
        assert stop(daemon) == 0, daemon.log
    (spool_path / ACTIVE).unlink()  # while it is stopped
    record("f")
    daemon = start_daemon(config)
    try:
        wait_delivered("rm while stopped")
    finally:
        assert stop(daemon) == 0, daemon.log
    other_writer_file("g")  # replaced while it is stopped
    record("h")
    (spool_path / CHECKPOINT).unlink()
    record("i")
    daemon = start_daemon(config)
    try:
        wait_delivered("replaced and checkpoint removed while stopped")
        host.answer_for = None
        wait_for(lambda: figures(config)["pending"] == 0, timeout=30)
    finally:
        assert stop(daemon) == 0, daemon.log


def test_a_version_1_checkpoint_is_taken_up_where_it_left_off(spool_path):
    """An upgrade: the checkpoint an older kmagent wrote (version 1: the file known by
    its inode and the CRC of its first line) resumes delivery, sending nothing again."""
    import zlib
    spool = open_jsonl(spool_path)
    for n in range(10):
        spool.append(event(n))
    spool.close()
    data = (spool_path / ACTIVE).read_bytes()
    starts = [0] + [i + 1 for i, b in enumerate(data) if b == 0x0A][:-1]
    (spool_path / CHECKPOINT).write_text(json.dumps({
        "v": 1, "seq": 1, "ino": os.stat(spool_path / ACTIVE).st_ino,
        "head": zlib.crc32(data[:starts[1]]), "offset": starts[5],
        "ahead": [[1, starts[7]]], "bad_lines": 0, "in_flight": 0, "lines": {},
        "moving": None}))
    spool = open_jsonl(spool_path)
    spool.recover()
    assert persons(drain(spool)) == ["person5", "person6", "person8", "person9"]
    assert json.loads((spool_path / CHECKPOINT).read_text())["v"] == 2
    spool.close()


# --- 6. bad.jsonl stays small ----------------------------------------------------------

def test_a_huge_bad_line_is_kept_by_its_start_and_its_length(spool_path):
    spool = open_jsonl(spool_path)
    with open(spool_path / ACTIVE, "ab") as fh:
        fh.write(b"\xff" + b"g" * (1 << 20) + b"\n")  # a megabyte of garbage, one line
    spool.append(event(1))
    assert persons(drain(spool)) == ["person1"]
    [record] = [json.loads(r) for r in (spool_path / "bad.jsonl").read_bytes().splitlines()]
    assert (spool_path / "bad.jsonl").stat().st_size < 5000
    assert (record["bytes"], record["cut"], record["offset"]) == ((1 << 20) + 2, True, 0)
    assert record["line"].startswith("\ufffdggg") and len(record["line"]) == 4096
    assert "not JSON" in record["reason"]
    spool.close()


def test_bad_jsonl_is_bounded_by_keeping_one_older_file(spool_path, monkeypatch):
    monkeypatch.setattr("kmagent.spool.jsonl.shipping.BAD_MAX_BYTES", 20_000)
    spool = open_jsonl(spool_path)
    for n in range(300):
        with open(spool_path / ACTIVE, "ab") as fh:
            fh.write(b"torn fragment %d %s\n" % (n, b"t" * 200))
    spool.append(event(1))
    assert persons(drain(spool)) == ["person1"]
    assert spool.stats(time.time())["bad_lines"] == 300
    assert (spool_path / "bad.jsonl").stat().st_size <= 20_000 + 1000
    assert (spool_path / "bad.jsonl.1").stat().st_size <= 20_000 + 1000
    assert sorted(p.name for p in spool_path.glob("bad*")) == ["bad.jsonl", "bad.jsonl.1"]
    last = json.loads((spool_path / "bad.jsonl").read_bytes().splitlines()[-1])
    assert last["line"].startswith("torn fragment 299 ") and last["cut"] is False
    spool.close()


# --- 7. a full disk: the shipper frees what it can and retries what failed ------------

def test_size_on_disk_counts_every_file_but_the_ballast(spool_path):
    spool = open_jsonl(spool_path)
    for n in range(10):
        spool.append(event(n))
    with open(spool_path / ACTIVE, "ab") as fh:
        fh.write(b"garbage\n")
    items = spool.claim(100, now=time.time())
    spool.dead_letter([items[0].id], status=400, reason="HTTP 400", now=time.time())
    spool.ack([i.id for i in items[1:]])
    (spool_path / "ballast").write_bytes(b"\0" * 100_000)
    everything = sum(p.stat().st_size for p in spool_path.iterdir() if p.name != "ballast")
    assert {"dead.jsonl", "bad.jsonl", CHECKPOINT, ACTIVE} <= {p.name for p in spool_path.iterdir()}
    assert spool.size_on_disk() == everything
    spool.close()


def test_near_max_bytes_the_delivered_active_file_is_sealed_and_freed(
        spool_path, monkeypatch):
    monkeypatch.setattr("kmagent.spool.jsonl.reading.PRESSURE_CHECK_S", 0.0)
    shipper = open_jsonl(spool_path, max_bytes=200_000)
    producer = open_jsonl(spool_path, max_bytes=200_000)
    with pytest.raises(SpoolFull):
        for n in range(10_000):
            producer.append(event(n, pad="p" * 500))
            producer._size_at = -1.0  # measure every time
    accepted = len(drain(shipper))
    assert accepted > 200
    drain(shipper)  # a claim after the last ack
    assert producer.size_on_disk() < 20_000  # sealed once delivered, and deleted
    producer._size_at = -1.0
    producer.append(event(99_999))  # room again, without waiting for rotate_seconds
    assert persons(drain(shipper)) == ["person99999"]
    shipper.close()
    producer.close()


def test_with_space_low_the_delivered_active_file_is_sealed_and_freed(
        small_disk, monkeypatch):
    monkeypatch.setattr("kmagent.spool.jsonl.reading.PRESSURE_CHECK_S", 0.0)
    path = small_disk / "spool"
    spool = open_jsonl(path, keep_free=1_200_000)  # under twice it: always low here
    assert spool.space_low()
    for n in range(2000):
        spool.append(event(n, pad="q" * 100))
    assert len(drain(spool)) == 2000
    drain(spool)
    assert not list(path.glob("events*.jsonl"))  # sealed and deleted, not kept an hour
    spool.close()


def test_shipper_writes_that_fail_for_want_of_space_succeed_when_retried(small_disk):
    """Acks recorded while the disk is full fail; the Shipper records them again (as
    kmagent's does) once there is room, and then they are on disk; a dead letter waits
    for room instead of failing. A restart sends again only what was never settled."""
    path = small_disk / "spool"
    spool = open_jsonl(path, keep_free=0)
    for n in range(200):
        spool.append(event(n))
    items = spool.claim(200, now=time.time())
    fill(small_disk)
    with pytest.raises(SpoolError, match="No space|no space"):
        spool.ack([i.id for i in items[:100]])  # the checkpoint cannot be written
    os.unlink(small_disk / "filler")
    spool.ack([i.id for i in items[:100]])
    spool.close()

    spool = open_jsonl(path, keep_free=0)
    spool.recover()
    items = spool.claim(200, now=time.time())
    assert persons(items) == [f"person{n}" for n in range(100, 200)]
    fill(small_disk)
    # A dead letter without room waits (the settle it is part of must go on: its acks
    # free room), and is written once there is room: here, at close.
    spool.dead_letter([items[0].id], status=400, reason="HTTP 400", now=time.time())
    assert spool.stats(time.time())["dead"] == 0
    os.unlink(small_disk / "filler")
    spool.close()

    spool = open_jsonl(path)
    spool.recover()
    assert persons(drain(spool)) == [f"person{n}" for n in range(101, 200)]
    assert spool.stats(time.time())["dead"] == 1
    spool.close()


def test_a_move_due_while_the_disk_is_full_happens_once_there_is_room(small_disk):
    path = small_disk / "spool"
    spool = open_jsonl(path, keep_free=0)
    for n in range(3000):
        spool.append(event(n))
    delivered, failures, filled, to_ack = collections.Counter(), 0, False, []
    for _ in range(200):
        if not filled and sum(delivered.values()) >= 2100:
            fill(small_disk)  # the line that keeps failing is due to move now
            filled = True
        elif filled and failures >= 3 and (small_disk / "filler").exists():
            os.unlink(small_disk / "filler")
        try:
            ship_holding_back_person0(spool, delivered, to_ack)
        except SpoolError:
            failures += 1
    assert failures >= 3 and not (small_disk / "filler").exists()
    copies = [line for file in path.glob("events*.jsonl")  # sealed early, maybe
              for line in file.read_bytes().splitlines() if b'"_o"' in line]
    assert len(copies) == 1  # moved once, once there was room
    spool.expedite()
    last = persons(drain(spool))
    assert "person0" in last and "person0" not in delivered
    delivered.update(last)
    assert set(delivered) == {f"person{n}" for n in range(3000)}
    assert spool.stats(time.time())["pending"] == 0
    spool.close()


@pytest.mark.parametrize("fails", ["recording the move", "writing the copy",
                                   "settling the old copy"])
def test_a_move_that_fails_for_want_of_space_is_finished_later(spool_path, monkeypatch,
                                                               fails):
    spool = open_jsonl(spool_path)
    for n in range(3000):
        spool.append(event(n))
    real_save = shipping.write_atomically
    real_requeue = JsonlSpool._requeue
    failed = []

    def full_once(what: str) -> None:
        if not failed:
            failed.append(what)
            raise OSError(errno.ENOSPC, "No space left on device")

    def save(path, data):
        moving = b'"moving":{' in data
        if (fails == "recording the move" and moving) or (
                fails == "settling the old copy" and b'"moving":null' in data and
                failed == [] and b'"_o"' in (spool_path / ACTIVE).read_bytes()):
            full_once(fails)
        return real_save(path, data)

    def requeue(self, data):
        if fails == "writing the copy":
            full_once(fails)
        return real_requeue(self, data)
    monkeypatch.setattr(shipping, "write_atomically", save)
    monkeypatch.setattr(JsonlSpool, "_requeue", requeue)
    delivered, errors, to_ack = collections.Counter(), 0, []
    for _ in range(200):
        try:
            ship_holding_back_person0(spool, delivered, to_ack)
        except SpoolError:
            errors += 1
    assert failed == [fails] and errors == 1
    spool.expedite()
    last = persons(drain(spool))
    assert last == ["person0"] and "person0" not in delivered
    assert set(delivered) | {"person0"} == {f"person{n}" for n in range(3000)}
    assert max(delivered.values()) == 1
    assert spool.stats(time.time())["pending"] == 0
    spool.close()


# --- 7, end to end: a real daemon on a full disk, the host down, then up ------------

@pytest.mark.parametrize("filled", ["to the reserve", "to the last byte", "keep_free = 0"])
def test_a_full_disk_with_the_host_down_delivers_every_accepted_event(
        host, small_disk, tmp_path, filled):
    """Producers fill a 2 MiB filesystem while the host is down (and, in the second
    case, another program takes the last byte after them: the daemon's ballast gives
    it room); once the host is back the running daemon delivers every event whose
    record() returned, frees the disk, and takes events again, without a restart."""
    spool = small_disk / "spool.jsonl.d"
    config = tmp_path / "small.toml"
    config.write_text(f'api_key = "{API_KEY}"\nendpoint = "{host.url}"\n'
                      f'[ship]\nmax_backoff = 1\n[spool]\nbackend = "jsonl"\n'
                      f'path = "{spool}"\n'
                      + ("keep_free = 0\n" if filled == "keep_free = 0" else ""))
    host.status = 503
    daemon = start_daemon(config)
    client = Client(config=config)
    accepted = []
    try:
        for n in range(100_000):
            try:
                client.record(f"p{n:06d}", "While Full", {"pad": "y" * 2000})  # fewer, to ship fast
            except (SpoolFull, SpoolError):
                break
            accepted.append(f"p{n:06d}")
        assert len(accepted) > 500  # over 1 MB of the 2 MiB taken by events
        if filled == "to the last byte":
            fill(small_disk, name="other-program")
        host.status = 200
        wait_for(lambda: set(accepted) <= set(delivered_persons(host)), timeout=90)
        wait_for(lambda: figures(config)["pending"] == 0, timeout=30)
        client.record("after", "Room Again")  # the delivered events' room came back
        wait_for(lambda: "after" in delivered_persons(host), timeout=30)
        assert daemon.poll() is None
    finally:
        assert stop(daemon) == 0, daemon.log[-3000:]


def test_a_checkpoint_rebuilt_numbers_files_after_every_dead_letter(spool_path):
    """Dead letters are known by their line's position: a file number given again
    after the checkpoint is lost would make two letters one."""
    spool = open_jsonl(spool_path, rotate_bytes=4096)
    for n in range(4):
        spool.append(event(n, pad="x" * 3000))  # a file each
        items = spool.claim(10, now=time.time())
        spool.dead_letter([i.id for i in items], status=400, reason="HTTP 400",
                          now=time.time())
    spool.close()
    (spool_path / CHECKPOINT).unlink()
    spool = open_jsonl(spool_path)
    spool.append(event(9))
    spool.recover()
    [item] = spool.claim(10, now=time.time())
    spool.dead_letter([item.id], status=400, reason="HTTP 400", now=time.time())
    assert len({d["id"] for d in spool.dead_letters()}) == 5
    spool.close()


@pytest.mark.parametrize("how", [["cp", "-a"], ["cp", "-r"]])
def test_a_spool_copied_to_a_new_place_sends_nothing_again(host, tmp_path, how):
    """Moving a spool to another disk (cp, rsync, a restore from backup) gives every file
    a new inode: the active file is still the one the checkpoint knows, by its first
    bytes, and nothing it says was delivered is sent again."""
    old, new = tmp_path / "old.jsonl.d", tmp_path / "new.jsonl.d"
    configs = {}
    for name, path in (("old", old), ("new", new)):
        configs[name] = tmp_path / f"{name}.toml"
        configs[name].write_text(f'api_key = "{API_KEY}"\nendpoint = "{host.url}"\n'
                                 f'[spool]\nbackend = "jsonl"\npath = "{path}"\n')
    client = Client(config=configs["old"])
    for n in range(300):
        client.record(f"p{n}", "Before The Move")
    client.close()
    assert run_kmagent("flush", "--config", str(configs["old"])).returncode == 0
    assert len(host.delivered()) == 300
    subprocess.run([*how, str(old), str(new)], check=True)
    Client(config=configs["new"]).record("after", "The Move")
    assert run_kmagent("flush", "--config", str(configs["new"])).returncode == 0
    assert delivered_persons(host)[300:] == ["after"]


def test_a_dead_letter_waiting_for_room_is_dropped_when_its_line_is_given_back(small_disk):
    # A reload gives back what its shipper held: that line is pending again, to be sent
    # again, and its old dead letter must never be written as well.
    path = small_disk / "spool"
    spool = open_jsonl(path, keep_free=0)
    spool.append(event(1))
    [item] = spool.claim(10, now=time.time())
    fill(small_disk)
    spool.dead_letter([item.id], status=None, reason="expired", now=time.time())
    spool.release([item.id])
    os.unlink(small_disk / "filler")
    spool.close()
    spool = open_jsonl(path)
    assert spool.stats(time.time())["dead"] == 0
    assert persons(drain(spool)) == ["person1"]
    spool.close()
