"""The faults: the process lane (kills, stops, signals), the host lane (the stand-in
host misbehaving), the disk lane (a full filesystem, a damaged checkpoint)."""

from __future__ import annotations

import os
import random
import signal
import time
import zlib
from typing import TYPE_CHECKING

from .registry import fault

if TYPE_CHECKING:
    from .run import Run


@fault("kill_producer", lane="process", weight=2)
def f_kill_producer(run: Run, rng: random.Random) -> None:
    victims = sorted(run.live_apps(), key=lambda i: i["pid"])
    if victims:
        run.kill(rng.choice(victims))


@fault("kill_daemon", lane="process", weight=2)
def f_kill_daemon(run: Run, rng: random.Random) -> None:
    run.daemon.stop(signal.SIGKILL)
    time.sleep(rng.uniform(0, 1.5))
    run.daemon.start()


@fault("term_daemon", lane="process")
def f_term_daemon(run: Run, rng: random.Random) -> None:
    run.daemon.stop(signal.SIGTERM)
    time.sleep(rng.uniform(0, 1.0))
    run.daemon.start()


@fault("sighup_daemon", lane="process", weight=0.5)
def f_sighup_daemon(run: Run, rng: random.Random) -> None:
    run.daemon.signal(signal.SIGHUP)


@fault("stop_producer", lane="process", weight=0.7)
def f_stop_producer(run: Run, rng: random.Random) -> None:
    """SIGSTOP a live app process for a while (a debugger, a freezer, a swap storm)."""
    victims = sorted(run.live_apps(), key=lambda i: i["pid"])
    if not victims:
        return
    victim = rng.choice(victims)
    try:
        os.kill(victim["pid"], signal.SIGSTOP)
    except ProcessLookupError:
        return
    run.note(f"SIGSTOP {victim['proc']} ({victim['pattern']}, pid {victim['pid']})")
    try:
        time.sleep(rng.uniform(0.3, 2.5))
    finally:
        try:
            os.kill(victim["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass


@fault("stop_daemon", lane="process", weight=0.5)
def f_stop_daemon(run: Run, rng: random.Random) -> None:
    """SIGSTOP the daemon for a while: its requests and leases age meanwhile."""
    run.daemon.signal(signal.SIGSTOP)
    try:
        time.sleep(rng.uniform(0.3, 2.5))
    finally:
        run.daemon.signal(signal.SIGCONT)


@fault("host_flaky", lane="host", weight=2)
def f_host_flaky(run: Run, rng: random.Random) -> None:
    run.host.fail_rate = rng.uniform(0.05, 0.4)
    run.host.reset_rate = rng.uniform(0.05, 0.3)
    time.sleep(rng.uniform(0.5, 3.0))
    run.host.fail_rate = run.host.reset_rate = 0.0


@fault("host_outage", lane="host")
def f_host_outage(run: Run, rng: random.Random) -> None:
    run.host.outage_status = rng.choice([503, 0])
    seconds = rng.uniform(0.5, 3.0)
    run.host.outage(seconds)
    time.sleep(seconds)


@fault("host_slow", lane="host", weight=0.5)
def f_host_slow(run: Run, rng: random.Random) -> None:
    run.host.delay = rng.uniform(0.02, 0.3)
    time.sleep(rng.uniform(0.5, 2.0))
    run.host.delay = 0.0


@fault("host_refuses", lane="host", weight=0.7)
def f_host_refuses(run: Run, rng: random.Random) -> None:
    share = rng.randint(3, 10)
    run.host.answer_for = lambda target: 400 if zlib.crc32(target.encode()) % share == 0 else None
    time.sleep(rng.uniform(0.5, 2.0))
    run.host.answer_for = None


@fault("host_retry_after", lane="host", weight=0.5)
def f_host_retry_after(run: Run, rng: random.Random) -> None:
    run.host.retry_after = "1"
    run.host.fail_rate = rng.uniform(0.2, 0.6)
    time.sleep(rng.uniform(0.5, 2.0))
    run.host.fail_rate = 0.0
    run.host.retry_after = None


DISK_MIB = 48  # the spool's own filesystem in the disk lane


@fault("disk_full", lane="disk")
def f_disk_full(run: Run, rng: random.Random) -> None:
    """Another program takes every byte left on the spool's filesystem for a while:
    record() may refuse (SpoolFull, SpoolError), and nothing it accepted is lost."""
    filler = run.disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    run.note("disk full")
    try:
        time.sleep(rng.uniform(0.5, 2.0))
    finally:
        os.unlink(filler)
    time.sleep(rng.uniform(1.0, 4.0))  # room again for a while: the backlog flows


@fault("damage_checkpoint", lane="disk", weight=0.5)
def f_damage_checkpoint(run: Run, rng: random.Random) -> None:
    """jsonl: checkpoint.json overwritten with garbage (the shipper rebuilds it by
    sending again what it cannot prove delivered: resends, never losses)."""
    if run.backend != "jsonl":
        return
    garbage = rng.choice([b"", b"{}", b"[]", b'{"seq": "x"}', os.urandom(300)])
    try:
        (run.spool / "checkpoint.json").write_bytes(garbage)
    except OSError:
        return
    run.note(f"checkpoint.json overwritten with {garbage[:20]!r}")
