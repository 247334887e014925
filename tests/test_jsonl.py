"""What only the newline-JSON spool has: its line format, torn and bad lines, rotation
by rename, the checkpoint, out-of-order acknowledgements, writers in many processes."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import figures, run_in_process, start_kmagent, stored_rows, wait_for

from kmagent import Client
from kmagent.errors import SpoolError
from kmagent.events import make_event
from kmagent.spool import open_spool
from kmagent.spool.jsonl import ACTIVE, CHECKPOINT
from kmagent.spool.jsonl.checkpoint import CHECKPOINT_VERSION

T0 = 1_700_000_000


pytestmark = pytest.mark.backends("jsonl")


def open_jsonl(path, **options):
    return open_spool(path, backend="jsonl", **options)


def event(n: int, **props):
    return make_event(f"person{n}", "Did", {"n": n, **props}, now=T0 + n)




def test_a_line_is_kissmetrics_import_json_plus_a_little(spool_path):
    spool_path.mkdir(parents=True)  # an existing directory is a jsonl spool
    Client("own-key", spool=spool_path).record(
        "bob", "Signed Up", {"Plan": "Pro", "Amount": 99.95, "_private": True},
        timestamp=1234567890)
    [line] = (spool_path / ACTIVE).read_bytes().splitlines()
    obj = json.loads(line)
    assert list(obj) == ["_p", "_n", "_t", "Plan", "Amount", "__private", "_c", "_k", "_v"]
    assert (obj["_p"], obj["_n"], obj["_t"], obj["Amount"], obj["_k"], obj["_v"]) == (
        "bob", "Signed Up", 1234567890, 99.95, "own-key", 1)


def test_lines_from_another_writer_are_shipped(host, write_config, spool_path):
    config = write_config(host)
    spool_path.mkdir(parents=True)
    (spool_path / ACTIVE).write_text(
        '{"_p":"bob","_n":"Signed Up","_t":1234567890,"Plan":"Pro"}\n'
        '{"_p":"bob","_p2":"bob@example.com","_t":1234567890}\n'
        '{"_p":"bob","_t":1234567890,"gender":"male","__x":1}\n')
    assert run_in_process("flush", "--timeout", "30", "--config", str(config)).returncode == 0
    assert sorted(r.target for r in host.delivered()) == sorted([
        "/e?_k=test-key&_p=bob&_n=Signed%20Up&_t=1234567890&_d=1&Plan=Pro",
        "/a?_k=test-key&_p=bob&_n=bob%40example.com",
        "/s?_k=test-key&_p=bob&_t=1234567890&_d=1&gender=male&_x=1",
    ])


def test_a_torn_line_is_set_aside_and_nothing_is_glued_to_it(host, write_config, spool_path):
    config = write_config(host)
    spool_path.mkdir(parents=True)
    # A producer killed mid-write leaves a line without its newline...
    (spool_path / ACTIVE).write_bytes(b'{"_p":"torn","_n":"Half","_t":12345')
    Client(config=config).record("bob", "Whole")  # ...the next one starts afresh
    (spool_path / ACTIVE).open("ab").write(b"garbage from an editor\n")
    Client(config=config).record("bob", "After Garbage")
    assert run_in_process("flush", "--timeout", "30", "--config", str(config)).returncode == 0
    names = sorted(dict(r.params)["_n"] for r in host.delivered())
    assert names == ["After Garbage", "Whole"]
    shown = figures(config)  # what `status --json` prints, read in-process
    assert (shown["bad_lines"], shown["pending"]) == (2, 0)
    set_aside = [json.loads(line) for line in (spool_path / "bad.jsonl").read_text().splitlines()]
    assert [b["line"] for b in set_aside] == [  # the NUL ended the torn line
        '{"_p":"torn","_n":"Half","_t":12345\x00\n', "garbage from an editor\n"]


def test_out_of_order_acks_resend_only_what_was_in_flight(spool_path):
    first = open_jsonl(spool_path)
    for n in range(10):
        first.append(event(n))
    items = first.claim(10, now=time.time())
    first.ack([i.id for i in items[2:7]])  # 0, 1 and 7..9 still in flight
    first.close()  # the shipper "dies"
    second = open_jsonl(spool_path)
    second.recover()
    again = second.claim(100, now=time.time())
    assert [i.query for i in again] == [items[n].query for n in (0, 1, 7, 8, 9)]
    assert second.stats(time.time())["pending"] == 5
    second.close()


def test_checkpoint_is_replaced_atomically(spool_path):
    spool = open_jsonl(spool_path)
    spool.append(event(1))
    spool.ack([i.id for i in spool.claim(1, now=time.time())])
    checkpoint = json.loads((spool_path / CHECKPOINT).read_text())
    assert checkpoint["v"] == CHECKPOINT_VERSION and checkpoint["offset"] > 0
    assert not (spool_path / (CHECKPOINT + ".tmp")).exists()
    spool.close()


def test_a_newer_checkpoint_format_is_refused(spool_path):
    spool_path.mkdir(parents=True)
    (spool_path / CHECKPOINT).write_text('{"v": 99, "seq": 1, "offset": 0}')
    with pytest.raises(SpoolError, match="newer"):
        open_jsonl(spool_path)


def test_rotation_seals_by_rename_and_producers_follow(spool_path):
    producer = open_jsonl(spool_path)
    shipper = open_jsonl(spool_path, rotate_bytes=4096)
    producer.append(event(0, pad="x" * 5000))
    [first] = shipper.claim(10, now=time.time())  # over rotate_bytes: sealed now
    assert sorted(p.name for p in spool_path.glob("events.*.jsonl")) == ["events.0000000001.jsonl"]
    producer.append(event(1))  # the producer notices the new inode and reopens
    assert (spool_path / ACTIVE).exists()
    [second] = shipper.claim(10, now=time.time())
    assert second.query.startswith("_p=person1&")
    shipper.ack([first.id])  # every line of the sealed file settled: it goes
    assert list(spool_path.glob("events.0*.jsonl")) == []
    assert shipper.stats(time.time())["pending"] == 1
    producer.close()
    shipper.close()


def test_a_sealed_file_stays_until_every_line_is_settled(spool_path):
    shipper = open_jsonl(spool_path, rotate_bytes=4096)
    for n in range(3):
        shipper.append(event(n, pad="x" * 2000))
    items = shipper.claim(10, now=time.time())
    shipper.claim(10, now=time.time())  # rotates
    shipper.ack([items[0].id, items[2].id])
    assert len(list(spool_path.glob("events.0*.jsonl"))) == 1
    shipper.dead_letter([items[1].id], status=400, reason="HTTP 400", now=time.time())
    assert list(spool_path.glob("events.0*.jsonl")) == []
    assert shipper.stats(time.time())["dead"] == 1
    shipper.close()


def test_rotation_while_the_daemon_ships_loses_and_repeats_nothing(
        host, write_config, spool_path):
    host.delay = 0.005
    config = write_config(host, extra="[ship]\nconcurrency = 4\n")
    with open(config, "a") as fh:
        fh.write("rotate_bytes = 4096\n")
    Client(config=config).close()
    daemon = start_kmagent("run", "--config", str(config))
    try:
        client = Client(config=config)
        for n in range(400):
            client.record(f"p{n}", "Rotated", {"pad": "y" * 100})
        wait_for(lambda: len(host.delivered()) >= 400, timeout=60)
    finally:
        daemon.terminate()
        assert daemon.wait(20) == 0
    seen = collections.Counter(dict(r.params)["_p"] for r in host.delivered())
    assert set(seen) == {f"p{n}" for n in range(400)} and max(seen.values()) == 1
    assert list(spool_path.glob("events.0*.jsonl")) == []  # sealed files cleaned up


WRITER = textwrap.dedent("""
    import sys, threading
    from kmagent import Client
    client = Client(config=sys.argv[1])
    def write(t):
        for n in range(100):
            client.record(f"w{sys.argv[2]}-{t}", f"n{n}", {"pad": "z" * 7000})
    threads = [threading.Thread(target=write, args=(t,)) for t in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
""")


def test_long_lines_from_many_processes_and_threads_never_interleave(write_config, spool_path):
    config = write_config()
    Client(config=config).close()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(config), str(w)])
               for w in range(4)]
    assert [w.wait(120) for w in writers] == [0] * 4
    lines = (spool_path / ACTIVE).read_bytes().splitlines()
    assert len(lines) == 800
    assert all(json.loads(line)["pad"] == "z" * 7000 for line in lines)  # none torn
    assert len(stored_rows(spool_path)) == 800


def test_full_durability_stores_events(write_config, spool_path):
    config = write_config(extra="")
    with open(config, "a") as fh:
        fh.write('durability = "full"\n')
    Client(config=config).record("bob", "Durable")
    assert [q.split("&")[1] for _, q, _ in stored_rows(spool_path)] == ["_n=Durable"]


def test_status_counts_pending_across_sealed_and_active_files(spool_path):
    shipper = open_jsonl(spool_path, rotate_bytes=4096)
    for n in range(3):
        shipper.append(event(n, pad="x" * 2000))
    shipper.claim(1, now=time.time())  # rotates: 3 lines sealed
    for n in range(3, 5):
        shipper.append(event(n))
    reader = open_jsonl(spool_path)
    assert reader.stats(time.time())["pending"] == 5
    assert os.path.exists(spool_path / "events.0000000001.jsonl")
    shipper.close()
    reader.close()


def test_one_event_that_keeps_failing_does_not_stop_the_rest(spool_path):
    """It is moved out of the way (written again at the end), so the checkpoint and the
    reader move on, and sealed files can still be deleted."""
    spool = open_jsonl(spool_path, rotate_bytes=65536)
    for n in range(6001):
        spool.append(event(n))
    delivered = 0
    for _ in range(400):
        items = spool.claim(64, now=time.time() + 1e6)
        if not items:
            break
        failing = [i for i in items if i.query.startswith("_p=person0&")]
        spool.retry([(i.id, time.time() + 1e7, "HTTP 503") for i in failing])
        spool.ack([i.id for i in items if i not in failing])
        delivered += len(items) - len(failing)
    assert delivered == 6000
    assert spool.stats(time.time())["pending"] == 1  # still there, still pending
    assert len(list(spool_path.glob("events.0*.jsonl"))) <= 1
    spool.close()


def test_a_moved_line_counts_as_before_a_mark_and_its_request_never_changes(spool_path):
    """A line moved out of the way (again and again) lands past a flush's mark, yet it
    was pending before the mark: pending_through counts it until it is settled. Its
    copies carry where it was first written; the request sent is the same every time."""
    spool = open_jsonl(spool_path)
    for n in range(3000):
        spool.append(event(n))
    mark = spool.mark()
    sent, later = [], 0
    # 200 turns (deterministic: one thread): person0's line is moved 3 times, each move
    # needing 2,048 deliveries past it, and sent 169 times; the asserts need 2 and 3.
    for _ in range(200):  # producers go on appending meanwhile
        for _ in range(32):
            spool.append(event(10_000 + later))
            later += 1
        items = spool.claim(64, now=time.time())
        failing = [i for i in items if i.query.startswith("_p=person0&")]
        sent += [(i.path, i.query, i.api_key, i.created) for i in failing]
        spool.retry([(i.id, 0.0, "HTTP 503") for i in failing])
        spool.ack([i.id for i in items if i not in failing])
        assert spool.pending_through(mark) >= 1
    files = sorted(spool_path.glob("events*.jsonl"))
    copies = [json.loads(line) for f in files for line in f.read_bytes().splitlines()
              if b'"_o"' in line]
    assert len(copies) >= 2  # moved more than once
    assert all(c["_o"] == [1, 0] and c["_p"] == "person0" for c in copies)
    assert len(set(sent)) == 1 and len(sent) > 2  # one request, sent again and again
    for _ in range(400):
        items = spool.claim(64, now=time.time())
        spool.retry([(i.id, 0.0, "HTTP 503") for i in items if i.query.startswith("_p=person0&")])
        spool.ack([i.id for i in items if not i.query.startswith("_p=person0&")])
        if spool.pending_through(mark) == 1:
            break
    assert spool.pending_through(mark) == 1  # only person0, wherever it lies now
    while True:
        items = spool.claim(64, now=time.time())
        assert items
        done = [i for i in items if i.query.startswith("_p=person0&")]
        spool.ack([i.id for i in done])
        if done:
            break
    spool.append(event(99_999))  # after the mark: not counted
    assert spool.pending_through(mark) == 0
    spool.close()


KILLED_WHILE_MOVING = textwrap.dedent("""
    import os, signal, sys, time
    from kmagent.events import make_event
    from kmagent.spool import open_spool
    path, point = sys.argv[1:3]
    spool = open_spool(path, backend="jsonl")
    # Enough that person0's line is moved (more than half the 4,096-line read-ahead,
    # MAX_AHEAD, read and flowing past it), few enough left for the flush to send.
    for n in range(2300):
        spool.append(make_event(f"person{n}", "Did", {"n": n}, now=1700000000 + n))
    real_write = os.write

    def write(fd, data):  # the shipper writing person0's line again: killed there
        if b'"_p":"person0"' in data:
            if point == "before the copy":
                os.kill(os.getpid(), signal.SIGKILL)
            written = real_write(fd, data)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(fd, data)
    os.write = write
    while True:  # person0 keeps failing; the rest is delivered
        items = spool.claim(64, now=time.time())
        spool.retry([(i.id, 0.0, "HTTP 503") for i in items if "person0&" in i.query])
        spool.ack([i.id for i in items if "person0&" not in i.query])
""")


@pytest.mark.parametrize("point", ["before the copy", "after the copy"])
def test_a_shipper_killed_while_moving_a_line_neither_loses_nor_doubles_it(
        host, write_config, spool_path, point):
    config = write_config(host)
    child = subprocess.run([sys.executable, "-c", KILLED_WHILE_MOVING, str(spool_path), point],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stderr
    assert run_in_process("flush", "--timeout", "30", "--config", str(config)).returncode == 0
    sent = collections.Counter(dict(r.params)["_p"] for r in host.received)
    assert sent["person0"] == 1 and max(sent.values()) == 1, sent.most_common(3)
    assert figures(config)["pending"] == 0


def test_a_move_cut_short_by_a_full_disk_neither_loses_nor_doubles_a_line(spool_path,
                                                                        monkeypatch):
    """Two lines that keep failing are moved together, in one write; the disk fills
    up after the first copy. That one has moved, the other stays where it was: each is
    still there once, and nothing torn is left behind."""
    spool = open_jsonl(spool_path)
    for n in range(3000):
        spool.append(event(n))
    stuck = ("_p=person0&", "_p=person1&")
    real = os.write

    def full_after_one_copy(fd: int, data: bytes) -> int:
        if b'"_o"' in data:
            monkeypatch.setattr(os, "write", real)
            return real(fd, data[:data.index(b"\n") + 10])  # one copy and a bit
        return real(fd, data)
    monkeypatch.setattr(os, "write", full_after_one_copy)
    failed = False
    for _ in range(100):
        try:  # by 100s: the read-ahead goes from under half full to past it at once
            items = spool.claim(100, now=time.time())
        except SpoolError:
            failed = True
            break
        spool.retry([(i.id, time.time() + 3600, "HTTP 503") for i in items
                     if i.query.startswith(stuck)])
        spool.ack([i.id for i in items if not i.query.startswith(stuck)])
    assert failed and os.write is real
    spool.expedite()
    claimed = collections.Counter()
    while items := spool.claim(64, now=time.time()):
        claimed.update(i.query.split("&")[0] for i in items)
        spool.ack([i.id for i in items])
    assert claimed["_p=person0"] == 1 and claimed["_p=person1"] == 1
    assert max(claimed.values()) == 1
    figures = spool.stats(time.time())
    assert (figures["pending"], figures["bad_lines"]) == (0, 0)
    spool.close()


def test_a_deeply_nested_line_is_a_bad_line_not_a_crash(host, write_config, spool_path):
    config = write_config(host)
    spool_path.mkdir(parents=True)
    (spool_path / ACTIVE).write_bytes(b"[" * 100_000 + b"\n")
    Client(config=config).record("bob", "After The Bomb")
    assert figures(config)["pending"] == 2
    assert run_in_process("flush", "--timeout", "30", "--config", str(config)).returncode == 0
    assert [dict(r.params)["_n"] for r in host.delivered()] == ["After The Bomb"]
    assert figures(config)["bad_lines"] == 1


def test_pending_counts_a_sealed_files_torn_tail_and_lines_end_only_at_newline(spool_path):
    spool = open_jsonl(spool_path, rotate_bytes=4096)
    spool.append(event(1, pad="x" * 5000))
    (spool_path / ACTIVE).open("ab").write(b'{"_p":"torn"')  # a writer died mid-line
    spool.claim(1, now=time.time())  # rotates: the torn tail is final now
    with open(spool_path / ACTIVE, "ab") as fh:
        fh.write(b'{"_p":"a\\rb","_n":"Carriage","_t":1700000000}\n')
    assert spool.stats(time.time())["pending"] == 3
    items = spool.claim(10, now=time.time())
    assert [i.query.split("&")[0] for i in items] == ["_p=a%0Db"]
    assert spool.stats(time.time())["bad_lines"] == 1
    spool.close()


def test_a_new_active_file_is_never_mistaken_for_the_checkpointed_one(spool_path):
    """Deleting events.jsonl while the daemon is down lets the filesystem give the new
    file the same inode number; the checkpoint's fingerprint of the first line tells
    them apart, so the new file is read from its start."""
    first = open_jsonl(spool_path)
    for n in range(10):
        first.append(event(n))
    first.ack([i.id for i in first.claim(10, now=time.time())])
    first.close()
    (spool_path / ACTIVE).unlink()
    producer = open_jsonl(spool_path)
    for n in range(10, 20):
        producer.append(event(n))
    producer.close()
    checkpoint = json.loads((spool_path / CHECKPOINT).read_text())
    checkpoint["ino"] = os.stat(spool_path / ACTIVE).st_ino  # as if the inode came back
    (spool_path / CHECKPOINT).write_text(json.dumps(checkpoint))
    shipper = open_jsonl(spool_path)
    shipper.recover()
    assert len(shipper.claim(100, now=time.time())) == 10
    shipper.close()


def test_an_active_file_deleted_by_hand_does_not_stop_shipping(spool_path):
    shipper = open_jsonl(spool_path)
    shipper.append(event(1))
    shipper.ack([i.id for i in shipper.claim(10, now=time.time())])
    (spool_path / ACTIVE).unlink()
    producer = open_jsonl(spool_path)
    for n in range(5):
        producer.append(event(n))
    claimed = shipper.claim(100, now=time.time()) + shipper.claim(100, now=time.time())
    assert len(claimed) == 5
    producer.close()
    shipper.close()


def test_a_short_write_stores_none_of_the_event_that_raised(tmp_path):
    """A full disk cuts a write short (RLIMIT_FSIZE stands in for it here): the append
    raises, the torn part is cut back, and nothing of it is ever sent."""
    spool = tmp_path / "spool"
    script = f"""
import resource, signal
from kmagent.errors import SpoolError
from kmagent.events import make_event
from kmagent.spool import open_spool
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a short write, not a killed process
store = open_spool({str(spool)!r}, backend="jsonl")
store.append(make_event("first", "Fits", now=1700000000))
size = (store.path / "events.jsonl").stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, resource.RLIM_INFINITY))
try:
    store.append(make_event("second", "Does not fit", {{"pad": "x" * 200}}, now=1700000000))
except SpoolError as exc:
    print("refused:", exc)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
store.append(make_event("third", "Fits again", now=1700000000))
print([q.split("&")[0] for _, q, _, _ in store.requests()])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert "refused:" in result.stdout, result.stderr
    assert "['_p=first', '_p=third']" in result.stdout


def test_a_short_group_write_fails_only_the_appends_it_did_not_store(tmp_path, monkeypatch):
    from test_spool_contract import behind_a_busy_writer

    from kmagent.errors import SpoolError
    from kmagent.events import make_event
    from kmagent.spool import open_spool
    store = open_spool(tmp_path / "spool", backend="jsonl")
    real = os.write

    def cut_short(fd: int, data: bytes) -> int:
        if b'"Grouped"' not in data:
            return real(fd, data)
        first_two = data.index(b"\n", data.index(b"\n") + 1) + 1
        return real(fd, data[:first_two + 5])  # two whole lines and the start of the third
    monkeypatch.setattr(os, "write", cut_short)
    outcomes = {}

    def append(n: int) -> None:
        try:
            store.append(make_event(f"p{n}", "Grouped", now=1700000000))
            outcomes[n] = "stored"
        except SpoolError:
            outcomes[n] = "refused"
    behind_a_busy_writer(store, [lambda n=n: append(n) for n in range(3)])
    monkeypatch.undo()
    assert outcomes == {0: "stored", 1: "stored", 2: "refused"}
    assert (tmp_path / "spool" / ACTIVE).read_bytes().count(b"\n") == 2  # cut back
    assert (tmp_path / "spool" / ACTIVE).read_bytes().endswith(b"\n")
    store.append(make_event("p3", "After", now=1700000000))
    assert [q.split("&")[0] for _, q, _, _ in store.requests()] == ["_p=p0", "_p=p1", "_p=p3"]
    store.close()


SHORT_BEFORE_NEWLINE = textwrap.dedent("""
    import os, resource, signal, sys, time
    from kmagent import Client
    from kmagent.errors import SpoolError
    from kmagent.spool import open_spool
    config, scratch, how = sys.argv[1:4]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a short write, not a killed process
    time.time = lambda: 1700000000.25  # every line the same bytes: its length is known
    probe = open_spool(scratch, backend="jsonl")
    Client(spool=scratch).record("bob", "Failed")
    length = os.path.getsize(os.path.join(scratch, "events.jsonl"))
    client = Client(config=config)
    client.record("bob", "Before")
    size = os.path.getsize(os.path.join(client._spool.path, "events.jsonl"))
    if how == "cannot-truncate":
        def refuse(fd, length):
            raise OSError(5, "Input/output error")
        os.ftruncate = refuse
    # The write of "Failed" stops exactly before its final newline.
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + length - 1, resource.RLIM_INFINITY))
    try:
        client.record("bob", "Failed")
    except SpoolError as exc:
        print("refused:", exc)
    else:
        print("stored")
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    client.record("bob", "After")
""")


@pytest.mark.parametrize("how", ["truncated", "cannot-truncate"])
def test_a_record_that_raised_is_never_delivered_even_if_only_its_newline_is_missing(
        host, write_config, spool_path, tmp_path, how):
    """A full disk stops the write one byte short: the whole line but its newline. The
    append raises, so the event must never be sent (an app that retries would count it
    twice); the one recorded next must be. The torn line is cut back under the lock, or,
    if even that fails, ended by the next writer so that it is a bad line, never a whole."""
    config = write_config(host)
    (tmp_path / "scratch").mkdir()
    Client(config=config).close()
    result = subprocess.run([sys.executable, "-c", SHORT_BEFORE_NEWLINE, str(config),
                             str(tmp_path / "scratch"), how],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout, result.stdout
    assert run_in_process("flush", "--timeout", "30", "--config", str(config)).returncode == 0
    assert sorted(dict(r.params)["_n"] for r in host.received) == ["After", "Before"]
    assert figures(config)["bad_lines"] == (1 if how == "cannot-truncate" else 0)


def test_a_torn_tail_is_never_sent_even_when_it_is_a_whole_json_object(
        host, write_config, spool_path):
    """A writer killed just before its newline leaves a whole object without its end.
    Neither the next writer (in the active file) nor the reader (once the file is sealed
    with it as its tail) may make a valid line of it."""
    config = write_config(host)
    with open(config, "a") as fh:
        fh.write("rotate_bytes = 4096\n")
    spool_path.mkdir(parents=True)
    killed = b'{"_p":"torn","_n":"Killed","_t":1700000000,"_v":1}'
    (spool_path / ACTIVE).write_bytes(killed)
    Client(config=config).record("bob", "Next Writer")
    spool = open_jsonl(spool_path, rotate_bytes=4096)
    spool.append(event(1, pad="x" * 5000))
    with open(spool_path / ACTIVE, "ab") as fh:
        fh.write(killed.replace(b"Killed", b"Sealed"))  # the file's tail when it is sealed
    spool.claim(1, now=time.time())  # over rotate_bytes: sealed with its torn tail
    spool.close()
    Client(config=config).record("bob", "After Rotation")
    assert run_in_process("flush", "--timeout", "30", "--config", str(config)).returncode == 0
    names = sorted(dict(r.params)["_n"] for r in host.received)
    assert names == ["After Rotation", "Did", "Next Writer"]
    shown = figures(config)  # what `status --json` prints, read in-process
    assert (shown["pending"], shown["bad_lines"]) == (0, 2)
