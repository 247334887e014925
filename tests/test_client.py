"""The producer API (README, "Recording events from Python"): Client and KM on real SQLite spools."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
from helpers import stored_rows as rows

import kmagent
from kmagent import KM, Client, InvalidEvent

PROJECT = Path(kmagent.__file__).resolve().parent.parent


def decode(query: str) -> dict[str, str]:
    return dict(parse_qsl(query, keep_blank_values=True, strict_parsing=True))


def stamped(query: str, before: float, after: float) -> str:
    """The query with its ``_t`` checked to lie in [before, after] and replaced by T."""
    match = re.search(r"&_t=(\d+)&", query)
    assert match, query
    assert int(before) <= int(match.group(1)) <= int(after), (query, before, after)
    return query[:match.start(1)] + "T" + query[match.end(1):]


@pytest.fixture
def client(spool_path):
    km = Client(spool=spool_path)
    yield km
    km.close()


# --- Client ---------------------------------------------------------------------------

def test_time_is_frozen_when_record_is_called(client, spool_path):
    before = time.time()
    client.record("bob", "Signed Up")
    after = time.time()
    time.sleep(1.1)
    client.record("bob", "Signed Up Again")
    (_, first, _), (_, second, _) = rows(spool_path)
    t1, t2 = int(decode(first)["_t"]), int(decode(second)["_t"])
    assert int(before) <= t1 <= int(after)
    assert t2 >= t1 + 1
    assert decode(first)["_d"] == "1"


def test_t_and_d_as_props_become_the_event_time_not_properties(client, spool_path):
    client.record("bob", "Signed Up", {"_d": 1, "_t": 1234567890})
    client.record("bob", "Signed Up", {"Plan": "Pro", "_t": 1234567890, "x": 1, "_d": 1})
    client.set("bob", {"_t": 1234567890, "gender": "male"})
    client.record("bob", "Signed Up", {"_t": "1234567890"})  # as the seed's string form
    assert [r[:2] for r in rows(spool_path)] == [
        ("e", "_p=bob&_n=Signed%20Up&_t=1234567890&_d=1"),
        ("e", "_p=bob&_n=Signed%20Up&_t=1234567890&_d=1&Plan=Pro&x=1"),
        ("s", "_p=bob&_t=1234567890&_d=1&gender=male"),
        ("e", "_p=bob&_n=Signed%20Up&_t=1234567890&_d=1"),
    ]


def test_timestamp_keyword_sets_the_time(client, spool_path):
    client.record("bob", "Signed Up", {"Plan": "Pro"}, timestamp=1234567890)
    client.set("bob", {"gender": "male"}, timestamp=1234567890.75)
    assert [r[:2] for r in rows(spool_path)] == [
        ("e", "_p=bob&_n=Signed%20Up&_t=1234567890&_d=1&Plan=Pro"),
        ("s", "_p=bob&_t=1234567890&_d=1&gender=male"),
    ]


def test_record_with_props_and_no_event_name_is_a_set(client, spool_path):
    before = time.time()
    client.record("bob", {"gender": "male", "age": 30})
    after = time.time()
    client.record("bob", {"gender": "female"}, timestamp=1234567890)
    (path1, q1, _), (path2, q2, _) = rows(spool_path)
    assert (path1, stamped(q1, before, after)) == ("s", "_p=bob&_t=T&_d=1&gender=male&age=30")
    assert (path2, q2) == ("s", "_p=bob&_t=1234567890&_d=1&gender=female")


def test_set_and_alias(client, spool_path):
    client.set("bob", {"gender": "male"}, timestamp=1234567890)
    client.alias("User 12345", "bob@bob.com")
    assert [r[:2] for r in rows(spool_path)] == [
        ("s", "_p=bob&_t=1234567890&_d=1&gender=male"),
        ("a", "_p=User%2012345&_n=bob%40bob.com"),
    ]


def test_calls_return_none(client):
    assert client.record("bob", "Did") is None
    assert client.record("bob", {"a": 1}) is None
    assert client.set("bob", {"a": 1}) is None
    assert client.alias("bob", "robert") is None


def test_api_key_is_stored_in_its_column_and_not_in_the_query(spool_path):
    keyed = Client("secret-key-123", spool=spool_path)  # positional, like Kissmetrics'
    keyed.record("bob", "Signed Up", {"Plan": "Pro"})
    keyed.set("bob", {"gender": "male"})
    keyed.alias("bob", "robert")
    keyed.close()
    plain = Client(spool=spool_path)
    plain.record("bob", "Signed Up")
    plain.close()
    stored = rows(spool_path)
    assert [r[2] for r in stored] == ["secret-key-123"] * 3 + [None]
    for _, query, _ in stored:
        assert "secret" not in query and "_k" not in decode(query)
    assert Client(api_key="other", spool=spool_path).api_key == "other"


def test_client_is_thread_safe(client, spool_path):
    threads_n, per_thread = 8, 200
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                client.record(f"person{t}", "Tick", {"thread": t, "i": i})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    stored = rows(spool_path)
    assert len(stored) == threads_n * per_thread
    assert len({q for _, q, _ in stored}) == threads_n * per_thread
    seen = set()
    for path, query, _ in stored:
        params = decode(query)
        assert path == "e" and params["_p"] == f"person{params['thread']}"
        seen.add((int(params["thread"]), int(params["i"])))
    assert seen == {(t, i) for t in range(threads_n) for i in range(per_thread)}
    assert kmagent.status(spool=spool_path)["pending"] == threads_n * per_thread


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_client_is_fork_safe(client, spool_path):
    client.record("parent", "Before Fork")  # the parent's handle is open and used
    per_side = 300
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            for i in range(per_side):
                client.record("child", "In Child", {"i": i})
            client.close()  # closing the child's handle must not disturb the parent's
            code = 0
        except BaseException:  # noqa: BLE001
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    for i in range(per_side):  # at the same time as the child
        client.record("parent", "In Parent", {"i": i})
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    client.record("parent", "After Child")  # the parent's handle survived the child
    events = sorted((decode(q)["_p"], decode(q)["_n"], decode(q).get("i"))
                    for _, q, _ in rows(spool_path))
    assert events == sorted(
        [("parent", "Before Fork", None), ("parent", "After Child", None)]
        + [("child", "In Child", str(i)) for i in range(per_side)]
        + [("parent", "In Parent", str(i)) for i in range(per_side)])
    conn = sqlite3.connect(spool_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_client_is_fork_safe_while_another_thread_records(client, spool_path):
    """A multi-threaded app forks while one of its threads is recording: the child must
    still be able to record (it must not inherit a lock held by a thread it lacks)."""
    stop = threading.Event()
    ticks = [0]

    def background() -> None:
        while not stop.is_set():
            client.record("background", "Tick")
            ticks[0] += 1

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    try:
        wait_until = time.monotonic() + 10
        while ticks[0] < 20 and time.monotonic() < wait_until:
            time.sleep(0.005)
        codes = []
        for n in range(40):  # a child forked mid-append hung a few % of the time
            pid = os.fork()
            if pid == 0:  # the child: never return into pytest
                code = 1
                try:
                    signal.alarm(3)  # a deadlocked child is killed by SIGALRM
                    client.record("child", "In Child", {"n": n})
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            codes.append(os.waitstatus_to_exitcode(status))
    finally:
        stop.set()
        thread.join(10)
    assert codes == [0] * 40, f"children exited {codes} (-{int(signal.SIGALRM)} = hung)"
    children = sorted(decode(q).get("n") for _, q, _ in rows(spool_path)
                      if decode(q)["_p"] == "child")
    assert children == sorted(str(n) for n in range(40))


def test_recording_does_not_import_the_http_stack_watchdog_or_click(tmp_path):
    """Once the spool exists: whoever creates (or upgrades) it imports sqlite-utils,
    and with it click, once in the spool's life (spool/sqlite_schema.py)."""
    from kmagent.spool import open_spool
    open_spool(tmp_path / "s.db").close()
    code = (
        "import kmagent, sys\n"
        f"km = kmagent.Client('k', spool={str(tmp_path / 's.db')!r})\n"
        "km.record('bob', 'Did', {'a': 1}); km.set('bob', {'a': 2}); km.alias('bob', 'b')\n"
        f"kmagent.KM.init(spool={str(tmp_path / 's.db')!r})\n"
        "kmagent.KM.identify('bob'); kmagent.KM.record('Did')\n"
        "print(sorted(m for m in ('http.client','kmagent.sender','watchdog','click','prometheus_client') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PROJECT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_kmagent_status_stays_callable(tmp_path):
    """``kmagent.status`` is a function however often it is called: importing its
    implementation must not shadow it with a submodule (checked in a fresh process, so
    that the order of the tests does not matter)."""
    spool = str(tmp_path / "s.db")
    code = (
        "import kmagent\n"
        f"kmagent.Client(spool={spool!r}).record('bob', 'Did')\n"
        f"first = kmagent.status(spool={spool!r})['pending']\n"
        f"second = kmagent.status(spool={spool!r})['pending']\n"
        "print(first, second, callable(kmagent.status))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PROJECT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1 1 True"


# --- KM -------------------------------------------------------------------------------

def test_km_record_set_and_alias(km, spool_path):
    km.identify("bob")
    before = time.time()
    km.record("Signed Up", {"Plan": "Pro"})
    km.record({"gender": "male"})
    km.set({"age": 30})
    km.record("Viewed")
    after = time.time()
    km.alias("bob", "bob@example.com")
    assert [(p, stamped(q, before, after) if p != "a" else q, k)
            for p, q, k in rows(spool_path)] == [
        ("e", "_p=bob&_n=Signed%20Up&_t=T&_d=1&Plan=Pro", None),
        ("s", "_p=bob&_t=T&_d=1&gender=male", None),
        ("s", "_p=bob&_t=T&_d=1&age=30", None),
        ("e", "_p=bob&_n=Viewed&_t=T&_d=1", None),
        ("a", "_p=bob&_n=bob%40example.com", None),
    ]


def test_km_alias_needs_no_identity(km, spool_path):
    km.alias("User 12345", "bob@bob.com")
    assert rows(spool_path) == [("a", "_p=User%2012345&_n=bob%40bob.com", None)]


def test_km_init_api_key_travels_with_its_events(km, spool_path):
    km.init("km-key", spool=spool_path)
    km.identify("bob")
    km.record("Did")
    assert [r[2] for r in rows(spool_path)] == ["km-key"]
    assert "km-key" not in rows(spool_path)[0][1]


def test_km_recording_before_identify_is_refused(km, spool_path):
    with pytest.raises(InvalidEvent, match="person"):
        km.record("Signed Up")
    with pytest.raises(InvalidEvent, match="person"):
        km.record({"gender": "male"})
    with pytest.raises(InvalidEvent, match="person"):
        km.set({"gender": "male"})
    assert rows(spool_path) == []
    with pytest.raises(InvalidEvent, match="person"):
        km.identify("")
    with pytest.raises(InvalidEvent, match="person"):
        km.identify("x" * 256)


def test_km_clear_identity_forgets_the_person(km, spool_path):
    km.identify("bob")
    km.record("Did")
    km.clear_identity()
    with pytest.raises(InvalidEvent):
        km.record("Did")
    assert len(rows(spool_path)) == 1


def test_the_seed_example_sequence(km, spool_path):
    before = time.time()
    KM.identify('bob@example.com')
    KM.record('Viewed Homepage')
    KM.record('Signed Up', {'Plan' : 'Pro', 'Amount' : 99.95})  # noqa: E203
    KM.record('Signed Up', {'_d' : 1, '_t' : 1234567890})  # noqa: E203
    KM.set({'gender' : 'male'})  # noqa: E203
    after = time.time()
    stored = rows(spool_path)
    assert [r[2] for r in stored] == [None] * 4
    assert stored[2][:2] == ("e", "_p=bob%40example.com&_n=Signed%20Up&_t=1234567890&_d=1")
    assert [(p, stamped(q, before, after) if i != 2 else q)
            for i, (p, q, _) in enumerate(stored)] == [
        ("e", "_p=bob%40example.com&_n=Viewed%20Homepage&_t=T&_d=1"),
        ("e", "_p=bob%40example.com&_n=Signed%20Up&_t=T&_d=1&Plan=Pro&Amount=99.95"),
        ("e", "_p=bob%40example.com&_n=Signed%20Up&_t=1234567890&_d=1"),
        ("s", "_p=bob%40example.com&_t=T&_d=1&gender=male"),
    ]


def test_km_identity_is_per_thread(km, spool_path):
    km.identify("main")  # must not leak into other threads
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []
    unidentified: list[object] = []

    def identified(person: str) -> None:
        try:
            KM.identify(person)
            barrier.wait(10)  # both threads now hold an identity at once
            for i in range(50):
                KM.record(f"From {person}", {"i": i})
                if i % 10 == 0:
                    time.sleep(0.001)  # let the other thread run in between
            KM.set({"who": person})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def stranger() -> None:
        try:
            KM.record("Anonymous")
        except InvalidEvent as exc:
            unidentified.append(exc)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        else:
            unidentified.append("recorded without an identity")

    threads = [threading.Thread(target=identified, args=(p,)) for p in ("alice", "bob")]
    threads.append(threading.Thread(target=stranger))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(unidentified) == 1 and isinstance(unidentified[0], InvalidEvent)
    stored = rows(spool_path)
    assert len(stored) == 2 * 51
    for path, query, _ in stored:
        params = decode(query)
        person = params["_p"]
        assert person in ("alice", "bob")
        if path == "e":
            assert params["_n"] == f"From {person}"
        else:
            assert params["who"] == person
    # the main thread's identity is its own
    km.record("Back In Main")
    assert decode(rows(spool_path)[-1][1])["_p"] == "main"


def test_km_identity_is_per_async_task(km, spool_path):
    async def worker(person: str) -> None:
        KM.identify(person)
        for i in range(20):
            await asyncio.sleep(0)  # the other task runs (and identifies) in between
            KM.record(f"From {person}", {"i": i})

    async def main() -> None:
        await asyncio.gather(worker("alice"), worker("bob"))
        with pytest.raises(InvalidEvent):  # the tasks' identities stayed in the tasks
            KM.record("From Main Task")

    asyncio.run(main())
    stored = rows(spool_path)
    assert len(stored) == 40
    persons = []
    for _, query, _ in stored:
        params = decode(query)
        assert params["_n"] == f"From {params['_p']}"
        persons.append(params["_p"])
    assert sorted(set(persons)) == ["alice", "bob"]
    switches = sum(1 for a, b in zip(persons, persons[1:]) if a != b)
    assert switches >= 10  # the two tasks really were interleaved
    with pytest.raises(InvalidEvent):
        km.record("From Outside")
