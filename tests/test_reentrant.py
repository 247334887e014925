"""record() never hangs: called again by the thread that is already inside the spool (a
signal handler, a logging hook), it stores the event or raises SpoolError at once.
And acks touch only their own rows: a row is settled only while it carries the lease
of the claim that sent it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest
from helpers import figures, record_many, start_daemon, stop, stored_rows, wait_for

from kmagent.errors import SpoolError
from kmagent.events import make_event
from kmagent.spool import open_spool


pytestmark = pytest.mark.backends()  # each test taking ``backend``: on each

@pytest.fixture
def store(spool_path, backend):
    spool = open_spool(spool_path, backend=backend)
    yield spool
    spool.close()


def event(n: int):
    return make_event(f"person{n}", "Did", {"n": n}, now=1_700_000_000 + n)


def within(seconds: float, fn) -> None:
    """Run ``fn`` in a thread; fail (rather than hang the suite) if it does not end."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "hung"
    if errors:
        raise errors[0]


def test_a_record_from_inside_a_write_raises_at_once_and_the_outer_one_is_stored(
        store, monkeypatch):
    real_write = store._write
    nested: list[str] = []

    def write_interrupted_by_a_handler(records, *, sync):
        if not nested:
            try:
                store.append(event(2))  # what a signal handler would do, right here
                nested.append("returned")
            except SpoolError as exc:
                nested.append(f"refused: {exc}")
        return real_write(records, sync=sync)

    monkeypatch.setattr(store, "_write", write_interrupted_by_a_handler)
    within(10, lambda: store.append(event(1)))
    assert nested[0].startswith("refused") and "signal handler" in nested[0]
    assert [q.split("&")[0] for _, q, _ in stored_rows(store.path)] == ["_p=person1"]


def test_a_record_from_a_thread_holding_the_lock_between_writes_is_stored(store):
    def nested() -> None:
        with store._lock:  # the thread is inside the spool, but no write is under way
            store.append(event(1))
    within(10, nested)
    assert len(stored_rows(store.path)) == 1


SIGNALS = textwrap.dedent("""
    import os, signal, sys
    from kmagent import Client, SpoolError
    client = Client(config=sys.argv[1])
    # The handler's own Client, or the one the main thread is inside.
    theirs = Client(config=sys.argv[1]) if sys.argv[3] == "another" else client
    returned, refused = [], []
    def handler(signum, frame):
        n = len(returned) + len(refused)
        try:
            theirs.record("handler", "Signal", {"n": n})
            returned.append(n)
        except SpoolError:
            refused.append(n)
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)
    for n in range(int(sys.argv[2])):
        client.record("main", "Loop", {"n": n})
    theirs.close()
    signal.setitimer(signal.ITIMER_REAL, 0)
    print(len(returned), len(refused))
""")


@pytest.mark.parametrize("through", ["the same client", "another"])
def test_records_from_a_signal_handler_never_hang(write_config, spool_path, through):
    result = subprocess.run(
        [sys.executable, "-c", SIGNALS, str(write_config()), "3000", through],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    returned, refused = map(int, result.stdout.split())
    rows = stored_rows(spool_path)
    from_handler = [q for _, q, _ in rows if q.startswith("_p=handler")]
    assert len(rows) - len(from_handler) == 3000
    assert len(from_handler) == returned and returned > 0


def test_a_repeated_ack_never_touches_an_event_that_reused_an_id(store):
    for n in range(3):
        store.append(event(n))
    first = store.claim(3, now=time.time())
    store.ack([item.id for item in first])
    for n in range(3, 6):
        store.append(event(n))  # SQLite: the table emptied, so the ids come back
    store.ack([item.id for item in first])  # a settle repeated after a spool error
    store.release([item.id for item in first])
    store.retry([(item.id, time.time() + 60, "again") for item in first])
    store.dead_letter([first[0].id], status=400, reason="again", now=time.time())
    assert store.stats(time.time())["pending"] == 3
    assert store.stats(time.time())["dead"] == 0
    again = store.claim(3, now=time.time())
    assert [i.query.split("&")[0] for i in again] == [f"_p=person{n}" for n in range(3, 6)]


def test_a_settle_of_an_older_claim_never_touches_the_newer_claim(store):
    store.append(event(1))
    [old] = store.claim(1, now=time.time())
    store.release([old.id])
    [new] = store.claim(1, now=time.time())
    store.retry([(old.id, time.time() + 3600, "stale")])  # late news of the old claim
    store.release([new.id])
    assert [i.query for i in store.claim(1, now=time.time())] == [new.query]


def test_a_spool_opened_from_inside_an_open_is_refused_at_once(spool_path, monkeypatch):
    """A signal handler that calls status() or makes a Client while its thread is
    opening a spool must not wait for itself."""
    from kmagent.spool import sqlite_conn
    real_connect = sqlite_conn._connect
    nested: list[str] = []

    def connect_interrupted_by_a_handler(path):
        if not nested:
            try:
                open_spool(spool_path).close()
                nested.append("opened")
            except SpoolError as exc:
                nested.append(f"refused: {exc}")
        return real_connect(path)

    monkeypatch.setattr(sqlite_conn, "_connect", connect_interrupted_by_a_handler)
    within(10, lambda: open_spool(spool_path).close())
    assert nested[0].startswith("refused") and "signal handler" in nested[0]


RAISING_HANDLER = textwrap.dedent("""
    import signal, sys, threading
    from kmagent import Client, KmagentError
    client = Client(config=sys.argv[1])
    class Timeout(Exception):
        pass
    armed = [False]
    def handler(signum, frame):
        if armed[0]:  # once per arming: never while the last one is being handled
            armed[0] = False
            raise Timeout("request took too long")  # a request-timeout decorator's way
    foreign, others, stop = [], [0], threading.Event()
    def worker(w):
        while not stop.is_set():
            try:
                client.record("worker", "Work", {"w": w, "n": others[0]})
                others[0] += 1
            except KmagentError:
                pass
            except BaseException as exc:
                foreign.append(type(exc).__name__)
    workers = [threading.Thread(target=worker, args=(w,)) for w in range(3)]
    [t.start() for t in workers]
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    done = 0
    while True:
        try:  # the handler may raise anywhere in here
            while done < 4000:
                armed[0] = True
                client.record("main", "Loop", {"n": done})
                done += 1
            armed[0] = False
            break
        except Timeout:
            continue
    signal.setitimer(signal.ITIMER_REAL, 0)
    stop.set()
    [t.join(10) for t in workers]
    lock = client._spool._lock
    print(sum(t.is_alive() for t in workers), lock._is_owned(), len(foreign))
""")


def test_an_exception_from_a_signal_handler_is_its_threads_own(write_config):
    """A handler that raises (a timeout decorator, Ctrl-C) must neither leave the lock
    held, wedging the other threads, nor be handed to other threads' record()."""
    result = subprocess.run([sys.executable, "-c", RAISING_HANDLER, str(write_config())],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "False", "0"]  # none hung, no lock, none foreign


def test_a_spool_file_deleted_by_hand_is_followed_by_the_process(spool_path):
    """An operator resets the spool (rm spool.db*) while an app runs: its next events
    go to the new file, through old handles and new ones, never into the deleted one."""
    from kmagent.spool.base import SIZE_CHECK_S
    old = open_spool(spool_path, max_bytes=1 << 30)
    old.append(event(1))
    for suffix in ("", "-wal", "-shm"):
        spool_path.with_name(spool_path.name + suffix).unlink(missing_ok=True)
    new = open_spool(spool_path)  # a new Client finds the file that is there now
    new.append(event(2))
    time.sleep(SIZE_CHECK_S)
    old.append(event(3))  # an old handle follows at its next size check
    old.close(), new.close()
    assert [q.split("&")[0] for _, q, _ in stored_rows(spool_path)] == [
        "_p=person2", "_p=person3"]


HOLD_THE_ACTIVE_FILE = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer stopped while it held the file
    print("held", flush=True)
    time.sleep(120)
""")


def test_a_writer_stopped_holding_the_jsonl_file_neither_hangs_nor_stops_shipping(
        host, write_config, spool_path, backend):
    if backend != "jsonl":
        pytest.skip("jsonl only: SQLite's own busy timeout bounds the wait")
    config = write_config(host)
    with open(config, "a") as fh:
        fh.write("rotate_bytes = 4096\n")  # the daemon wants to rotate at once
    record_many(config, 100)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_ACTIVE_FILE,
                               str(spool_path / "events.jsonl")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        daemon = start_daemon(config)
        try:
            wait_for(lambda: figures(config)["pending"] == 0, timeout=30)
        finally:
            started = time.monotonic()
            assert stop(daemon) == 0
            assert time.monotonic() - started < 10
        started = time.monotonic()
        with pytest.raises(SpoolError, match="stayed locked"):
            record_many(config, 1)
        assert time.monotonic() - started < 15
    finally:
        holder.kill()
        holder.wait()
    assert len({r.target for r in host.delivered()}) == 100


def test_a_handler_raising_as_the_jsonl_flock_is_taken_leaves_it_free(
        spool_path, backend, monkeypatch):
    if backend != "jsonl":
        pytest.skip("jsonl only: the flock of events.jsonl")
    import fcntl
    import os
    from kmagent.spool.jsonl import active as jsonl
    store = open_spool(spool_path, backend="jsonl")
    real = jsonl.flock_within

    def taken_then_interrupted(fd, *args):
        real(fd, *args)
        raise KeyboardInterrupt  # a handler raising the instant the flock is held
    monkeypatch.setattr(jsonl, "flock_within", taken_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.append(event(1))
    other = os.open(spool_path / "events.jsonl", os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    finally:
        os.close(other)
        store.close()


def test_a_handler_raising_inside_the_fork_hook_leaves_no_lock_held(store):
    """Python reports and ignores an exception raised in an at-fork hook, and forks
    anyway: the locks the hook took must still be released after."""
    import threading
    from kmagent.spool import shared as shared_module

    class InterruptedAfterTaking:
        def __init__(self) -> None:
            self.inner = threading.RLock()

        def acquire(self) -> None:
            self.inner.acquire()
            raise KeyboardInterrupt  # between taking it and anything after

        def release(self) -> None:
            self.inner.release()

    class Fake:
        lock = InterruptedAfterTaking()
    fake = Fake()
    real_live = shared_module._live
    live = list(real_live) + [fake]
    shared_module._live = live
    try:
        with pytest.raises(KeyboardInterrupt):
            shared_module._before_fork()
        shared_module._after_fork()
    finally:
        shared_module._live = real_live
    within(10, lambda: store.append(event(1)))
    free: list[bool] = []
    within(10, lambda: free.append(fake.lock.inner.acquire(blocking=False)))
    assert free == [True]  # another thread can take it: nobody holds it


BUSY_UNDER_AN_ITIMER = textwrap.dedent("""
    import signal, sqlite3, subprocess, sys, time
    from kmagent.spool import open_spool
    from kmagent.events import make_event
    path = sys.argv[1]
    spool = open_spool(path)
    holder = subprocess.Popen([sys.executable, "-c", f'''
    import sqlite3, time
    c = sqlite3.connect({path!r}, isolation_level=None); c.execute("BEGIN IMMEDIATE")
    print("held", flush=True); time.sleep(1.0); c.execute("COMMIT")'''],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    signal.signal(signal.SIGALRM, lambda *a: None)  # a sampling profiler's way
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    spool.append(make_event("p", "Waited", {}, now=1_700_000_000))
    signal.setitimer(signal.ITIMER_REAL, 0)
    holder.wait()
    print("stored", spool.stats(0)["pending"])
""")


def test_a_writer_busy_for_a_second_is_waited_for_even_under_an_itimer(spool_path, backend):
    if backend != "sqlite":
        pytest.skip("SQLite's busy wait")
    result = subprocess.run([sys.executable, "-c", BUSY_UNDER_AN_ITIMER, str(spool_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["stored", "1"]


def test_a_spool_directory_removed_by_hand_gives_spool_errors_only(spool_path, backend):
    """record() raises only kmagent's own errors, even once an operator has run
    rm -r on a jsonl spool (or removed the SQLite file's directory)."""
    import shutil
    from kmagent.spool.base import SIZE_CHECK_S
    store = open_spool(spool_path, backend=backend, max_bytes=1 << 30)
    store.append(event(1))
    shutil.rmtree(spool_path.parent)
    time.sleep(SIZE_CHECK_S + 0.1)
    for n in range(3):
        try:
            store.append(event(n + 2))
        except SpoolError:
            pass
    store.close()


FORKS_UNDER_A_RAISING_HANDLER = textwrap.dedent("""
    import os, signal, sys, threading, time
    from kmagent import Client
    client = Client(config=sys.argv[1])
    class Boom(Exception):
        pass
    armed = [False]
    def handler(*_):
        if armed[0]:
            raise Boom()  # wherever it lands, the fork hooks included
    signal.signal(signal.SIGALRM, handler)
    last = [time.monotonic()]
    stop = threading.Event()
    def worker():
        while not stop.is_set():
            client.record("worker", "Work", {})
            last[0] = time.monotonic()
    threading.Thread(target=worker, daemon=True).start()
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    end, forks = time.monotonic() + 3, 0
    while time.monotonic() < end:
        try:
            armed[0] = True
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            armed[0] = False
            os.waitpid(pid, 0)
            forks += 1
        except Boom:
            armed[0] = False
        if time.monotonic() - last[0] > 2:
            armed[0] = False
            print("hung", flush=True)
            os._exit(1)
    armed[0] = False
    signal.setitimer(signal.ITIMER_REAL, 0)
    stop.set()
    print("ok", forks, flush=True)
    os._exit(0)
""")


def test_a_handler_raising_while_the_app_forks_never_wedges_other_threads(write_config):
    result = subprocess.run(
        [sys.executable, "-c", FORKS_UNDER_A_RAISING_HANDLER, str(write_config())],
        capture_output=True, text=True, timeout=60)
    assert result.stdout.split()[:1] == ["ok"], (result.stdout, result.stderr[-2000:])
