"""The spool contract, run against every backend (one suite, many implementations)."""

from __future__ import annotations

import collections
import os
import sqlite3
import time
from urllib.parse import parse_qsl

import pytest

from kmagent.errors import SpoolError
from kmagent.events import make_alias, make_event, make_set
from kmagent.spool import BACKENDS as SPOOL_BACKENDS, open_spool

from helpers import shipping_session

T0 = 1_700_000_000


# "sqlite-3.34": the claim SQLite before 3.35 gets (no RETURNING), on this SQLite.
@pytest.fixture(params=[*SPOOL_BACKENDS, "sqlite-3.34"])
def backend(request, monkeypatch) -> str:
    if request.param == "sqlite-3.34":
        monkeypatch.setattr("kmagent.spool.sqlite.HAS_RETURNING", False)
        return "sqlite"
    return request.param


@pytest.fixture
def location(tmp_path, backend):
    return tmp_path / ("spool.db" if backend == "sqlite" else "spool")


@pytest.fixture
def store(location, backend):
    spool = open_spool(location, backend=backend)
    yield spool
    spool.close()


def event(n: int, api_key: str | None = None):
    return make_event(f"person{n}", "Did", {"n": n}, api_key=api_key, now=T0 + n)


def persons(items) -> list[str]:
    return [item.query.split("&")[0] for item in items]


def test_append_then_claim_returns_oldest_first_with_the_stored_request(store):
    store.append(event(1, api_key="k1"))
    store.append(make_set("bob", {"gender": "male"}, now=T0))
    store.append(make_alias("bob", "bob@example.com"))
    items = store.claim(10, now=time.time())
    assert [(i.path, i.query, i.api_key, i.attempts) for i in items] == [
        ("e", f"_p=person1&_n=Did&_t={T0 + 1}&_d=1&n=1", "k1", 1),
        ("s", f"_p=bob&_t={T0}&_d=1&gender=male", None, 1),
        ("a", "_p=bob&_n=bob%40example.com", None, 1),
    ]


def test_claimed_events_are_not_claimed_again_and_stay_pending(store):
    for n in range(5):
        store.append(event(n))
    first = store.claim(3, now=time.time())
    second = store.claim(10, now=time.time())
    assert persons(first) == ["_p=person0", "_p=person1", "_p=person2"]
    assert persons(second) == ["_p=person3", "_p=person4"]
    assert store.claim(10, now=time.time()) == []
    figures = store.stats(time.time())
    assert figures["pending"] == 5 and figures["in_flight"] == 5


def test_ack_forgets_only_what_it_names(store):
    for n in range(4):
        store.append(event(n))
    items = store.claim(4, now=time.time())
    store.ack([items[1].id, items[3].id])
    store.release([items[0].id, items[2].id])
    assert store.stats(time.time())["pending"] == 2
    assert persons(store.claim(10, now=time.time())) == ["_p=person0", "_p=person2"]


def test_retry_waits_until_due_and_counts_attempts(store):
    store.append(event(1))
    [item] = store.claim(1, now=time.time())
    later = time.time() + 30
    store.retry([(item.id, later, "HTTP 503")])
    assert store.claim(1, now=time.time()) == []
    assert store.next_due() == pytest.approx(later)
    [again] = store.claim(1, now=later + 1)
    # The same event, under a new claim's lease (ids are opaque: compare the request).
    assert again.query == item.query and again.attempts == 2


def test_expedite_makes_backed_off_events_due_now(store):
    store.append(event(1))
    [item] = store.claim(1, now=time.time())
    store.retry([(item.id, time.time() + 3600, "HTTP 503")])
    assert store.expedite() == 1
    assert [i.query for i in store.claim(1, now=time.time())] == [item.query]


def test_dead_letter_moves_the_event_out_of_pending(store):
    store.append(event(1))
    store.append(event(2))
    first, second = store.claim(2, now=time.time())
    store.dead_letter([first.id], status=400, reason="HTTP 400", now=time.time())
    store.ack([second.id])
    figures = store.stats(time.time())
    assert (figures["pending"], figures["dead"]) == (0, 1)


def test_recover_gives_back_what_a_dead_shipper_had_in_flight(location, backend):
    crashed = open_spool(location, backend=backend)
    for n in range(3):
        crashed.append(event(n))
    claimed = crashed.claim(2, now=time.time())
    crashed.close()  # the shipper "dies" without ack or release
    successor = open_spool(location, backend=backend)
    try:
        successor.recover()
        again = successor.claim(10, now=time.time())
        assert persons(claimed) == ["_p=person0", "_p=person1"]
        assert persons(again) == ["_p=person0", "_p=person1", "_p=person2"]
        assert successor.stats(time.time())["pending"] == 3
    finally:
        successor.close()


def test_with_key_only_skips_events_without_a_key(store):
    store.append(event(1))
    store.append(event(2, api_key="own-key"))
    items = store.claim(10, now=time.time(), with_key_only=True)
    assert [i.api_key for i in items] == ["own-key"]
    assert store.next_due(with_key_only=True) is None
    assert store.next_due() is not None


def test_mark_and_pending_through_ignore_later_events(store):
    for n in range(3):
        store.append(event(n))
    mark = store.mark()
    store.append(event(3))
    assert store.pending_through(mark) == 3
    items = store.claim(2, now=time.time())
    store.ack([i.id for i in items])
    assert store.pending_through(mark) == 1
    assert store.stats(time.time())["pending"] == 2


def test_mark_stays_meaningful_after_the_spool_empties(store):
    store.append(event(1))
    store.ack([i.id for i in store.claim(1, now=time.time())])
    mark = store.mark()
    store.append(event(2))
    assert store.pending_through(mark) == 0


def test_stats_report_the_oldest_pending_age(store):
    assert store.stats(time.time())["oldest_pending_age_s"] is None
    store.append(event(1))
    time.sleep(0.05)
    store.append(event(2))
    age = store.stats(time.time() + 10)["oldest_pending_age_s"]
    assert 10.04 < age < 12


def test_events_survive_reopening(location, backend):
    with open_spool(location, backend=backend) as first:
        first.append(event(1))
    with open_spool(location, backend=backend) as second:
        assert persons(second.claim(5, now=time.time())) == ["_p=person1"]


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_full_durability_syncs_before_append_returns(location, backend, durability,
                                                     monkeypatch):
    """"full" reaches the disk before append() returns; "normal" leaves it to the OS."""
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    with open_spool(location, backend=backend, durability=durability) as spool:
        spool.append(event(1))
        assert spool.stats(time.time())["pending"] == 1
        if backend == "sqlite":  # SQLite syncs in C: ask it what it was told
            level = spool._connection().execute("PRAGMA synchronous").fetchone()[0]
            assert level == {"normal": 1, "full": 2}[durability]
        else:
            assert len(synced) == (1 if durability == "full" else 0)


def test_sqlite_spool_is_wal_and_refuses_a_newer_format(tmp_path):
    path = tmp_path / "spool.db"
    open_spool(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute("PRAGMA user_version = 99")
    conn.execute("UPDATE kmagent_format SET writable_by = 99")  # not for this kmagent
    conn.commit()
    conn.close()
    with pytest.raises(SpoolError, match="newer"):
        open_spool(path)


def test_unwritable_location_is_a_spool_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpoolError):
        open_spool(blocker / "spool.db")



def test_requests_lists_what_is_unsettled_in_order_and_the_dead_apart(store):
    for n in range(8):
        store.append(event(n))
    items = store.claim(4, now=time.time())
    store.ack([items[1].id, items[2].id])  # out of order: 0 and 3 still in flight
    store.dead_letter([items[3].id], status=400, reason="refused", now=time.time())
    assert [q.split("&")[0] for _, q, _, _ in store.requests()] == [
        "_p=person0", "_p=person4", "_p=person5", "_p=person6", "_p=person7"]
    assert [(p, q.split("&")[0]) for p, q, _, _ in store.requests(dead=True)] == [("e", "_p=person3")]
    assert all(created > 0 for _, _, _, created in store.requests())


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_concurrent_appends_are_each_stored_once(location, backend, durability):
    import threading
    spool = open_spool(location, backend=backend, durability=durability)
    per_thread = 30 if durability == "full" else 200

    def produce(t: int) -> None:
        for n in range(per_thread):
            spool.append(event(t * 1000 + n))
    threads = [threading.Thread(target=produce, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = [q.split("&")[0] for _, q, _, _ in spool.requests()]
    spool.close()
    assert sorted(stored) == sorted(f"_p=person{t * 1000 + n}"
                                    for t in range(8) for n in range(per_thread))


def behind_a_busy_writer(store, appends) -> None:
    """Run each of ``appends`` in a thread while the test holds the lock, as if another
    writer were busy, so that they queue in this order; then let them go."""
    import threading
    threads = [threading.Thread(target=append) for append in appends]
    with store._holding():  # the lock, marked busy: what a writer holds
        for n, thread in enumerate(threads, 1):
            thread.start()
            deadline = time.monotonic() + 10
            while len(store._waiting) < n and time.monotonic() < deadline:
                time.sleep(0.001)
    for thread in threads:
        thread.join()


def test_a_failed_group_write_fails_every_append_in_the_group(store, monkeypatch):
    failures = []

    def append() -> None:
        try:
            store.append(event(1))
        except SpoolError as exc:
            failures.append(exc)

    def refuse(records, *, sync):
        raise SpoolError(f"disk full ({len(records)} records)")
    monkeypatch.setattr(store, "_write", refuse)
    behind_a_busy_writer(store, [append] * 3)
    assert [str(exc) for exc in failures] == ["disk full (3 records)"] * 3


def test_a_forked_child_does_not_write_its_parent_s_queued_appends(store):
    slot = [("queued", "by another thread of the parent"), None, False]
    store._waiting.append(slot)
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if not store._waiting else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert list(store._waiting) == [slot]  # still the parent's to write
    finally:
        store._waiting.clear()


def _two_appends_behind_a_busy_writer(store) -> dict[int, str]:
    """Appends 1 and 2 from two threads, queued while the test holds the lock."""
    outcomes: dict[int, str] = {}

    def append(n: int) -> None:
        try:
            store.append(event(n))
            outcomes[n] = "returned"
        except KeyboardInterrupt:
            outcomes[n] = "interrupted"
        except SpoolError as exc:
            outcomes[n] = f"refused: {exc}"

    behind_a_busy_writer(store, [lambda: append(1), lambda: append(2)])
    return outcomes


def test_appends_popped_by_a_writer_interrupted_before_writing_are_written_by_their_own(
        store):
    class InterruptedAfterOnePop(collections.deque):
        def popleft(self):
            entry = super().popleft()
            if not getattr(self, "done", False):
                self.done = True
                raise KeyboardInterrupt  # popped, then a signal handler raised
            return entry

    store._sharing().waiting = InterruptedAfterOnePop()
    outcomes = _two_appends_behind_a_busy_writer(store)
    assert sorted(outcomes.values()) == ["interrupted", "returned"]
    [returned] = [n for n, outcome in outcomes.items() if outcome == "returned"]
    stored = [q.split("&")[0] for _, q, _, _ in store.requests()]
    # What returned is stored; the interrupted one may be too (it was not told either
    # way); nothing is stored twice.
    assert f"_p=person{returned}" in stored and len(stored) == len(set(stored))


def test_appends_in_a_write_that_was_interrupted_are_never_written_twice(store, monkeypatch):
    real_write = store._write

    def write_then_interrupt(records, *, sync):
        real_write(records, sync=sync)
        raise KeyboardInterrupt  # a signal handler raising as the write ends

    monkeypatch.setattr(store, "_write", write_then_interrupt)
    outcomes = _two_appends_behind_a_busy_writer(store)
    assert sorted(o.split(":")[0] for o in outcomes.values()) == ["interrupted", "refused"]
    assert any("may or may not be stored" in o for o in outcomes.values())
    assert sorted(q.split("&")[0] for _, q, _, _ in store.requests()) == ["_p=person1", "_p=person2"]


class OneAnswer:
    """A sender that answers every request the same, at once."""

    api_key = "k"

    def __init__(self, outcome) -> None:
        self.outcome = outcome

    def send(self, item):
        return self.outcome

    def close(self) -> None:
        pass


def test_a_settle_repeated_after_a_spool_error_touches_only_its_own_claim(store,
                                                                         monkeypatch):
    """ack, retry, release and dead_letter apply to an event only while it carries the
    lease of the claim that sent it. After a spool error the shipper records the same
    outcomes again: by then the event may have been claimed anew, and neither that
    repeat nor a stale ack may touch the new claim."""
    from kmagent.sender import TRANSIENT, Outcome
    from kmagent.shipper import Shipper
    store.append(event(1))
    store.append(event(2))
    shipper = Shipper(shipping_session(store), OneAnswer(Outcome(TRANSIENT, 503, "HTTP 503")),
                      concurrency=2,
                      max_backoff=1, clock=lambda: T0)  # retries due long ago: at once
    try:
        assert shipper.fill() == 2
        deadline = time.monotonic() + 10
        while len(shipper._done) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        real_retry = store.retry

        def retry_then_fail(entries):
            real_retry(entries)  # recorded, then the spool fails (as a full disk would)
            raise SpoolError("injected: disk full")
        monkeypatch.setattr(store, "retry", retry_then_fail)
        with pytest.raises(SpoolError, match="injected"):
            shipper.settle()  # the shipper keeps the outcomes, to record them again
        monkeypatch.undo()
        first = {item.query: item for item in shipper._in_flight.values()}
        again = store.claim(10, now=time.time())  # the retried events, claimed anew
        assert sorted(i.query for i in again) == sorted(first)
        assert all(i.id != first[i.query].id for i in again)  # each under a new lease
        shipper.settle()  # the outcomes recorded again: the retries of the old claims
        stale = [first[i.query].id for i in again]
        store.ack(stale[:1])  # late news of an old claim
        store.release(stale)
        store.dead_letter(stale[1:], status=400, reason="stale", now=time.time())
        figures = store.stats(time.time())
        assert (figures["pending"], figures["in_flight"], figures["dead"]) == (2, 2, 0)
        assert store.claim(10, now=time.time()) == []  # both still the new claims'
        store.ack([again[0].id])
        store.ack([again[0].id])  # repeated: harmless
        store.retry([(again[1].id, time.time() + 3600, "HTTP 503")])
        store.retry([(again[1].id, 0.0, "HTTP 503")])  # repeated: changes nothing
        assert store.stats(time.time())["pending"] == 1
        assert store.claim(10, now=time.time()) == []  # waits out the first retry
        assert store.next_due() == pytest.approx(time.time() + 3600, abs=60)
    finally:
        shipper.shutdown(0)


def test_claims_and_acks_too_big_for_a_full_disk_go_in_smaller_batches(store, monkeypatch):
    """On a full disk, a write for the whole window can need more room than the reserve
    holds while a smaller one fits (SQLite's WAL): the shipper must shrink its claims
    and acks down to what fits, not fail the same write for ever. (The real case, on a
    real full filesystem: test_heal.)"""
    from kmagent.sender import DELIVERED, Outcome
    from kmagent.shipper import Shipper
    for n in range(20):
        store.append(event(n))
    real_claim, real_ack = store.claim, store.ack

    def fits(count: int, most: int) -> None:
        if count > most:
            raise SpoolError("spool x: write failed: database or disk is full")

    def claim(limit, **kwargs):
        fits(limit, 8)  # of a window of 16
        return real_claim(limit, **kwargs)

    def ack(ids):
        ids = list(ids)
        fits(len(ids), 2)
        real_ack(ids)
    monkeypatch.setattr(store, "claim", claim)
    monkeypatch.setattr(store, "ack", ack)
    shipper = Shipper(shipping_session(store), OneAnswer(Outcome(DELIVERED, 200, None)),
                      concurrency=8,
                      max_backoff=1)
    try:
        deadline = time.monotonic() + 10
        while store.stats(time.time())["pending"] and time.monotonic() < deadline:
            shipper.step()
            time.sleep(0.01)
        assert shipper.delivered_total == 20
        assert shipper.claim_limit.limit is not None  # they shrank, and stay near what fits
        assert shipper.record_limit.limit is not None
    finally:
        shipper.shutdown(0)


def test_only_the_holder_of_the_shipper_lock_gets_a_shipping_session(store):
    from kmagent.lock import ShipperLock
    lock = ShipperLock(store.lock_path)
    with pytest.raises(SpoolError, match="shipper lock"):
        store.ship(lock)
    assert lock.try_acquire()
    store.append(event(1))
    with store.ship(lock) as session:
        assert len(session.claim(10, now=T0 + 10)) == 1
        lock.release()  # another process may ship now: this session must not
        with pytest.raises(SpoolError, match="no longer ships"):
            session.claim(10, now=T0 + 10)
    assert lock.try_acquire()
    session = store.ship(lock)
    session.close()
    with pytest.raises(SpoolError, match="no longer ships"):
        session.ack([])


def test_dead_letters_without_room_wait_and_let_the_acks_behind_them_through(store,
                                                                              monkeypatch):
    """On a disk too full for a dead letter (SQLite needs a new page for it), the
    refused events wait, out of the window, while every delivered one is acked (which
    is what frees room); once there is room they are written."""
    from kmagent.sender import DELIVERED, PERMANENT, Outcome
    from kmagent.shipper import Shipper
    for n in range(60):
        store.append(event(n))
    real_dead_letter, room = store.dead_letter, [False]

    def dead_letter(ids, **kwargs):
        if not room[0]:
            raise SpoolError("spool x: dead-letter failed: database or disk is full")
        real_dead_letter(ids, **kwargs)
    monkeypatch.setattr(store, "dead_letter", dead_letter)

    class RefusesEveryThird(OneAnswer):
        def send(self, item):
            n = int(dict(parse_qsl(item.query))["n"])
            return Outcome(PERMANENT, 400, "HTTP 400") if n % 3 == 0 else \
                Outcome(DELIVERED, 200, None)
    shipper = Shipper(shipping_session(store), RefusesEveryThird(None), concurrency=2,
                      max_backoff=1)  # a window of 4: 20 refused would fill it five times
    try:
        deadline = time.monotonic() + 10
        while shipper.delivered_total < 40 and time.monotonic() < deadline:
            shipper.step()
            time.sleep(0.005)
        assert shipper.delivered_total == 40 and shipper.dead_total == 0
        room[0] = True  # the acks freed room
        while store.stats(time.time())["pending"] and time.monotonic() < deadline:
            shipper.step()
            time.sleep(0.005)
        assert shipper.dead_total == 20 and store.stats(time.time())["dead"] == 20
    finally:
        shipper.shutdown(0)


def test_a_dead_letter_written_before_a_batch_failed_is_counted_once(store, monkeypatch):
    """A dead letter that fails for another reason than room fails the batch, which is
    recorded again: those already written are not counted twice."""
    from kmagent.sender import PERMANENT, Outcome
    from kmagent.shipper import Shipper
    for n in range(4):
        store.append(event(n))
    real_dead_letter, calls = store.dead_letter, [0]

    def dead_letter(ids, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise SpoolError("spool x: dead-letter failed: attempt to write a readonly database")
        real_dead_letter(ids, **kwargs)
    monkeypatch.setattr(store, "dead_letter", dead_letter)
    monkeypatch.setattr(store, "out_of_room", lambda exc: False)
    shipper = Shipper(shipping_session(store), OneAnswer(Outcome(PERMANENT, 400, "HTTP 400")),
                      concurrency=4, max_backoff=1)
    try:
        deadline = time.monotonic() + 10
        while store.stats(time.time())["pending"] and time.monotonic() < deadline:
            try:
                shipper.step()
            except SpoolError:
                pass  # the daemon's loop logs it and tries again
            time.sleep(0.005)
        assert store.stats(time.time())["dead"] == 4 and shipper.dead_total == 4
    finally:
        shipper.shutdown(0)
