"""The app side, run in producer processes: the App a pattern works with (ids, the
ledger, pacing, its own randomness), the API adapters it records through, and the
helpers for threads, forks and making clients."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from .registry import EVENT_NAMES


class Interrupted(BaseException):
    """Raised by signal_raises' handler, like KeyboardInterrupt: not an Exception."""


class ChildExit(BaseException):
    """A forked child that finished: unwinds to producer_main, which exits normally."""


class AppOver(BaseException):
    """The app's time ran out while kmagent could not be opened (or opening it raised
    what it must not): the pattern stops there, as finished."""


def proc_start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): tells reused pids apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()[19]


class Ledger:
    """One file per process (reopened after fork), one os.write() per line."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._pid = -1
        self._fd = -1

    def line(self, *parts: str) -> None:
        pid = os.getpid()
        if pid != self._pid:
            self._fd = os.open(self.dir / f"{pid}.ledger",
                               os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._pid = pid
        os.write(self._fd, (" ".join(parts) + "\n").encode())


class App:
    """What a pattern works with: ids, the ledger, pacing, its own seeded randomness."""

    def __init__(self, spec: dict[str, Any], label: str | None = None,
                 role: str = "producer") -> None:
        self.spec = spec
        self.seed = spec["seed"]
        self.config = spec["config"]
        self.workdir = Path(spec["workdir"])
        self.end = spec["end"]
        self.rate = spec["rate"]
        self.lineage = list(spec.get("lineage", []))
        self.proc = spec["proc"] if label is None else f"{spec['proc']}.{label}"
        self.rng = random.Random(f"{self.seed}/{self.proc}")
        self.counter = itertools.count()
        self.ledger = Ledger(self.workdir / "ledger")
        self.register(role)

    # -- identity and process registry
    def register(self, role: str) -> None:
        pid = os.getpid()
        info = {"pid": pid, "ppid": os.getppid(), "proc": self.proc, "role": role,
                "pattern": self.spec["pattern"], "end": self.end,
                "lineage": self.lineage, "start": proc_start_time(pid)}
        path = self.workdir / "procs" / f"{pid}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)

    def done(self) -> None:
        (self.workdir / "procs" / f"{os.getpid()}.done").write_text("")

    def selfkill(self) -> None:
        """SIGKILL this process, on purpose (the engine counts it as killed)."""
        (self.workdir / "procs" / f"{os.getpid()}.selfkill").write_text("")
        os.kill(os.getpid(), signal.SIGKILL)

    def crash(self) -> None:
        text = traceback.format_exc()
        sys.stderr.write(f"[{self.proc} pid {os.getpid()}] {text}")
        self.ledger.line("crash", "-", json.dumps(text))

    def child_spec(self) -> dict[str, Any]:
        """The spec a child process of this one gets (its lineage includes us)."""
        return {**self.spec, "proc": self.proc, "lineage": self.lineage + [os.getpid()]}

    def become_child(self, label: str, role: str = "child") -> None:
        """In a forked child: a new name, its own randomness, registered."""
        self.lineage = self.lineage + [self.pid_before_fork]
        self.proc = f"{self.proc}.{label}"
        self.rng = random.Random(f"{self.seed}/{self.proc}")
        self.counter = itertools.count()
        self.register(role)

    # -- recording
    def running(self) -> bool:
        return time.time() < self.end

    def tid(self) -> str:
        return f"{self.seed}-{self.proc}-{os.getpid()}-{next(self.counter)}"

    def pace(self, rng: random.Random, share: float = 1.0) -> None:
        """Sleep so that this thread records about rate * share events per second."""
        wait = min(0.25, rng.expovariate(max(1.0, self.rate * share)))
        left = self.end - time.time()
        if left > 0:
            time.sleep(min(wait, left))

    def emit(self, api: Any, rng: random.Random, kinds: str = "eeeeeeeeessa") -> str:
        """One call through ``api`` (record, set or alias), ledgered."""
        tid = self.tid()
        kind = rng.choice(kinds)
        person = getattr(api, "person", None) or f"person{rng.randrange(50)}"
        if kind == "a":
            return self.call(tid, api.a, f"user {tid}", f"alias-{tid}")
        props: dict[str, Any] = {"tid": tid, "who": person}
        if kind == "e":
            props["pad"] = "x" * rng.randrange(0, 300)
            if rng.random() < 0.3:
                props.update({"Amount": round(rng.uniform(0, 500), 2), "Pro": rng.random() < 0.5,
                              "Note": "ünïcode ☃ & spaces"})
            return self.call(tid, api.e, person, rng.choice(EVENT_NAMES), props)
        props["plan"] = rng.choice(("Free", "Pro", "Pro Plus"))
        return self.call(tid, api.s, person, props)

    def call(self, tid: str, fn: Callable[..., Any], *args: Any) -> str:
        from kmagent import InvalidEvent, KmagentError
        try:
            fn(*args)
        except InvalidEvent as exc:  # these events are valid: refusing one is a bug
            self.ledger.line("bad", tid, type(exc).__name__, json.dumps(
                f"valid event refused: {exc}\n{traceback.format_exc()}"))
            return "bad"
        except KmagentError as exc:
            self.ledger.line("raised", tid, type(exc).__name__, json.dumps(str(exc)))
            return "raised"
        except (Interrupted, ChildExit):
            self.ledger.line("unknown", tid, "interrupted")
            raise
        except Exception as exc:
            self.ledger.line("bad", tid, type(exc).__name__, json.dumps(traceback.format_exc()))
            return "bad"
        self.ledger.line("ok", tid)
        return "ok"

    def loop(self, api: Any, rng: random.Random | None = None, share: float = 1.0) -> None:
        rng = rng or self.rng
        while self.running():
            self.emit(api, rng)
            self.pace(rng, share)


class ClientAPI:
    """kmagent.Client, or compat Client: the person is explicit."""

    person = None

    def __init__(self, client: Any) -> None:
        self.client = client

    def e(self, person, name, props):
        self.client.record(person, name, props)

    def s(self, person, props):
        self.client.set(person, props)

    def a(self, person, identity):
        self.client.alias(person, identity)


class KMAPI:
    """kmagent.KM: the current person of this thread or task (identify() first)."""

    def __init__(self, person: str, identify: bool = True) -> None:
        from kmagent import KM
        self.km = KM
        self.person = person
        if identify:
            KM.identify(person)

    def e(self, person, name, props):
        self.km.record(name, props)

    def s(self, person, props):
        self.km.set(props)

    def a(self, person, identity):
        self.km.alias(person, identity)


class CompatKMAPI(KMAPI):
    """kmagent.compat.kissmetrics.KM: the identity belongs to the instance."""

    def __init__(self, km: Any, person: str) -> None:
        self.km = km
        self.person = person
        km.identify(person)


def run_threads(app: App, count: int, body: Callable[[int, random.Random], None]) -> None:
    def guarded(i: int) -> None:
        try:
            body(i, random.Random(f"{app.seed}/{app.proc}/t{i}"))
        except AppOver:
            pass
        except BaseException:
            app.crash()
    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(1.0, app.end - time.time() + 60))


def fork_child(app: App, label: str, body: Callable[[App], None], role: str = "child") -> int:
    """os.fork(); the child runs ``body(app)`` registered under its own name, then exits
    (os._exit or a normal interpreter exit, as its randomness says). Call it from the
    main thread only, and not inside try/finally or with blocks."""
    app.pid_before_fork = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:
        app.become_child(label, role)
        body(app)
    except AppOver:
        pass
    except BaseException:
        app.crash()
        os._exit(3)
    app.done()
    if app.rng.random() < 0.5:
        os._exit(0)
    raise ChildExit()


def reap(pids: list[int], until: float) -> None:
    """Wait for forked children (they end by themselves at the app's end)."""
    pending = set(pids)
    while pending and time.time() < until:
        for pid in list(pending):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                pending.discard(pid)
        time.sleep(0.05)


def construct(app: App, what: str, make: Callable[[], Any]) -> Any:
    """``make()`` (a Client, KM.init, a compat client...). A KmagentError is allowed
    (noted in the ledger) and the app tries again until its end; anything else is a
    failure, and stops the pattern."""
    from kmagent import KmagentError
    while True:
        try:
            return make()
        except KmagentError as exc:
            app.ledger.line("note", what, json.dumps(f"{type(exc).__name__}: {exc}"))
        except Exception as exc:
            app.ledger.line("bad", "-", f"{what}:{type(exc).__name__}",
                            json.dumps(traceback.format_exc()))
            raise AppOver() from None
        if not app.running():
            raise AppOver()
        time.sleep(0.1)


def new_client(app: App, api_key: str | None = None):
    from kmagent import Client
    return construct(app, "Client()", lambda: Client(api_key, config=app.config))


# -- the patterns ------------------------------------------------------------------
