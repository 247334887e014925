#!/usr/bin/env python3
"""kmagent's torture suite: real app processes, real daemons, real faults, one seed.

    python tests/torture.py --seed N --seconds S --backend sqlite|jsonl|both
                            [--patterns a,b] [--faults x,y|none] [--short] [--keep] [--list]

S is the length of the chaos phase (apps, faults, operators); the drain and the oracle
follow. --short is the pytest mode's shape (fewer patterns, shorter hang waits).

One integer seed decides everything random: the configuration (concurrency,
durability, how the run drains), which app patterns run, when and how fast, which
faults strike and when, and what the operators type. Apps are separate Python
processes (this file, run with ``--producer SPEC``); each keeps a LEDGER, one line per
call: ``ok TID`` written only after record()/set()/alias() returned, ``raised TID TYPE
MESSAGE`` when it raised. Every call carries its own id (``tid`` property, or the alias
identity ``alias-TID``), so every attempt is told apart at the stand-in host.

App patterns (PATTERNS; ``--patterns`` runs a subset, each can run alone):
  plain               one Client, one thread (the baseline)
  threads             one Client shared by 2-4 threads
  two_clients         2-3 Clients in one process, used alternately, now and then replaced
  km_reinit           kmagent.KM, KM.init() called again after use, a second KM thread
  status_in_app       kmagent.status() between records (a health endpoint)
  compat_per_request  kmagent.compat.kissmetrics KM(key) / Client(key) made per request
  asyncio_tasks       asyncio tasks, each with its own KM identity, some calls in threads
  web_wsgi, web_asgi  kmagent.web's middleware around an app: a one-thread WSGI server, or
                      concurrent ASGI requests with sync work in a pool; requests that log
                      in, are named by the identify hook, are anonymous, stream, raise.
                      An anonymous request's record() must refuse (else LeakedPerson)
  fork_inherited      os.fork(); parent and child go on with the INHERITED Client
  fork_new_client     os.fork(); the child makes a NEW Client
  fork_parent_exits   os.fork(); the parent exits at once, the child goes on
  gunicorn_preload    master makes a Client, forks workers that record, master SIGKILLs itself
  mp_fork, mp_forkserver, mp_spawn
                      multiprocessing Process or Pool workers with that start method
  signal_handler      record() from SIGALRM (setitimer) and SIGUSR1 (another process)
                      handlers while the main thread records: must return or raise, not hang
  signal_raises       a SIGALRM handler raises (like KeyboardInterrupt) into the main
                      thread's record() while other threads record
  cli_commands        `kmagent record/set/alias` commands, ledgered on exit 0
  km_log_km, km_log_kmts, km_log_kmphp, km_log_kissmetrics_php
                      a writer of Kissmetrics' own query log in one of the daemon's
                      [km_log] dirs, as that library writes it (kmts under an flock,
                      the others with none; kissmetrics-php as serialize()d arrays)

Faults (FAULTS, in two lanes that overlap; ``--faults`` picks, ``none`` for none):
  process lane: kill_producer (SIGKILL a live app process), kill_daemon (SIGKILL and
                restart), term_daemon (SIGTERM, must exit 0, restart), sighup_daemon,
                stop_producer / stop_daemon (SIGSTOP for a while, then SIGCONT)
  host lane:    host_flaky (fail_rate/reset_rate), host_outage (503s or resets),
                host_slow, host_refuses (400 for some events: dead letters),
                host_retry_after
  disk lane:    disk_full (another program takes every byte of the spool's own 48 MiB
                tmpfs for a while), damage_checkpoint (jsonl: garbage in checkpoint.json);
                root only (a tmpfs), else left out
Operators, at random times: status [--json], flush --timeout 2, dead list [--json],
dead retry --all, export [--dead], reload. Exit codes may be nonzero; a traceback on stderr
or a hang is a failure.

The oracle, once producers are done, faults over, the host healthy and the spool
drained (by the daemon, or by `kmagent flush`, as the seed says):
  1. every ledgered ``ok`` id reached the host with a 200 answer;
  2. every resend is byte-identical: all request targets of one id are one string;
  3. SQLite: PRAGMA integrity_check is ok (every kmagent process has exited); jsonl: no
     more bad lines than app processes were killed; both: status pending == 0, dead 0;
  4. nothing hangs: apps, operators and daemons end within their timeouts, and an app
     never stops recording before its end for long (a hung one is dumped with py-spy
     if installed, and by faulthandler, then SIGKILLed);
  5. an id whose call raised a KmagentError never reached the host (except a SpoolError
     that says the event "may or may not" be stored); any other exception type, and
     InvalidEvent for these valid events, is a failure;
  6. KM's current person: an event carries the person its thread or task identified.

Adding to it: a pattern is a function ``f(app)`` decorated ``@pattern("name", "what")``
that records through ``app.emit(api, rng)`` until ``app.running()`` is false (``api`` is
one of the adapters ClientAPI/KMAPI/CompatKMAPI, or anything with e/s/a methods);
fork with ``fork_child(app, label, body)``. A fault is ``f(run, rng)`` decorated
``@fault("name", lane="process"|"host")``; it may block for its duration. Operators
are the OPERATOR_COMMANDS table. Everything else (ledgers, oracle, hang checks) follows.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import faulthandler
import itertools
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

API_KEY = "torture-key"
COMPAT_KEYS = (API_KEY, API_KEY, "torture-compat-key")
EVENT_NAMES = ("Signed Up", "Viewed Homepage", "Checkout & Pay", "Viewed Página",
               "billing/renew", "Clicked ☃")
TID_RE = re.compile(r"^\d+-[A-Za-z0-9_.]+-\d+-\d+$")
TRACEBACK = "Traceback (most recent call last)"

# ----------------------------------------------------------------------------------
# Registries
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    name: str
    fn: Callable[["App"], None]
    what: str
    weight: float


@dataclass(frozen=True)
class Fault:
    name: str
    fn: Callable[["Run", random.Random], None]
    lane: str
    weight: float


PATTERNS: dict[str, Pattern] = {}
FAULTS: dict[str, Fault] = {}


def pattern(name: str, what: str = "", weight: float = 1.0):
    def register(fn):
        PATTERNS[name] = Pattern(name, fn, what, weight)
        return fn
    return register


def fault(name: str, lane: str = "process", weight: float = 1.0):
    def register(fn):
        FAULTS[name] = Fault(name, fn, lane, weight)
        return fn
    return register


# ----------------------------------------------------------------------------------
# The app side: runs in producer processes
# ----------------------------------------------------------------------------------


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


class CompatKMAPI:
    """kmagent.compat.kissmetrics.KM: the identity belongs to the instance."""

    def __init__(self, km: Any, person: str) -> None:
        self.km = km
        self.person = person
        km.identify(person)

    def e(self, person, name, props):
        self.km.record(name, props)

    def s(self, person, props):
        self.km.set(props)

    def a(self, person, identity):
        self.km.alias(person, identity)


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


@pattern("plain", "one Client, one thread")
def pat_plain(app: App) -> None:
    app.loop(ClientAPI(new_client(app)))


@pattern("threads", "one Client shared by 2-4 threads")
def pat_threads(app: App) -> None:
    api = ClientAPI(new_client(app))
    n = app.rng.randint(2, 4)
    run_threads(app, n, lambda i, rng: app.loop(api, rng, 1 / n))


@pattern("two_clients", "2-3 Clients in one process used alternately")
def pat_two_clients(app: App) -> None:
    rng = app.rng
    apis = [ClientAPI(new_client(app)) for _ in range(rng.randint(2, 3))]
    while app.running():
        app.emit(rng.choice(apis), rng)
        if rng.random() < 0.01:  # an app that replaces a client now and then
            k = rng.randrange(len(apis))
            old, apis[k] = apis[k], ClientAPI(new_client(app))
            if rng.random() < 0.5:
                old.client.close()
        app.pace(rng)


@pattern("km_reinit", "kmagent.KM, KM.init() again after use, a second KM thread")
def pat_km_reinit(app: App) -> None:
    from kmagent import KM
    rng = app.rng
    construct(app, "KM.init()", lambda: KM.init(config=app.config))

    def other(i: int, trng: random.Random) -> None:
        app.loop(KMAPI(f"km-thread-{os.getpid()}-{i}"), trng, 0.5)
    helper = threading.Thread(target=lambda: run_threads(app, 1, other), daemon=True)
    helper.start()
    api = KMAPI(f"km-main-{os.getpid()}")
    next_init = rng.randint(10, 150)
    while app.running():
        app.emit(api, rng)
        next_init -= 1
        if next_init <= 0:
            key = None if rng.random() < 0.7 else API_KEY
            construct(app, "KM.init()", lambda: KM.init(key, config=app.config))
            next_init = rng.randint(10, 150)
        app.pace(rng, 0.5)
    helper.join(60)


@pattern("status_in_app", "kmagent.status() between records")
def pat_status_in_app(app: App) -> None:
    import kmagent
    from kmagent import KmagentError
    rng = app.rng
    api = ClientAPI(new_client(app))
    while app.running():
        app.emit(api, rng)
        if rng.random() < 0.1:
            try:
                figures = kmagent.status(app.config)
                if not isinstance(figures, dict) or "pending" not in figures:
                    app.ledger.line("bad", "-", "status", json.dumps(f"status() gave {figures!r}"))
            except KmagentError as exc:
                app.ledger.line("note", "status()", json.dumps(f"{type(exc).__name__}: {exc}"))
            except Exception as exc:
                app.ledger.line("bad", "-", type(exc).__name__, json.dumps(traceback.format_exc()))
        app.pace(rng)


@pattern("compat_per_request", "compat KM(key) / Client(key) made per request")
def pat_compat(app: App) -> None:
    from kmagent.compat.kissmetrics import KM as CompatKM
    from kmagent.compat.kissmetrics import Client as CompatClient
    rng = app.rng
    while app.running():
        key = rng.choice(COMPAT_KEYS)
        if rng.random() < 0.7:
            km = construct(app, "compat.KM()", lambda: CompatKM(key, config=app.config))
            api = CompatKMAPI(km, f"visitor{rng.randrange(100)}")
            closer = km.client
        else:
            closer = construct(app, "compat.Client()",
                               lambda: CompatClient(key, config=app.config))
            api = ClientAPI(closer)
        for _ in range(rng.randint(1, 3)):
            app.emit(api, rng)
        if rng.random() < 0.3:
            closer.close()
        app.pace(rng)


@pattern("asyncio_tasks", "asyncio tasks with their own KM identity")
def pat_asyncio(app: App) -> None:
    from kmagent import KM
    construct(app, "KM.init()", lambda: KM.init(config=app.config))
    client = new_client(app)
    n = app.rng.randint(3, 6)

    async def task(i: int) -> None:
        rng = random.Random(f"{app.seed}/{app.proc}/task{i}")
        person = f"task{i}-{os.getpid()}"
        km = KMAPI(person)  # identified in this task's own context
        direct = ClientAPI(client)
        loop = asyncio.get_running_loop()
        while app.running():
            roll = rng.random()
            if roll < 0.1:
                trng = random.Random(rng.random())
                await loop.run_in_executor(None, app.emit, direct, trng)
            else:
                app.emit(km if roll < 0.6 else direct, rng)
            await asyncio.sleep(min(0.25, rng.expovariate(max(1.0, app.rate / n))))

    async def main() -> None:
        await asyncio.gather(*(task(i) for i in range(n)))
    asyncio.run(main())


# -- web apps: a person per request (kmagent.web) ----------------------------------

WEB_KINDS = ("login", "hook", "anonymous", "stream", "stream_anonymous", "raises")


def web_record(app: App, rng: random.Random, expected: str | None) -> None:
    """One call in a request, for its current person: ``expected`` (the oracle checks
    the event's _p against it) or, in an anonymous request, no one: then KM must refuse,
    and an event recorded for anyone is a leak."""
    from kmagent import KM, InvalidEvent
    if expected is not None:
        app.emit(KMAPI(expected, identify=False), rng, kinds="eeees")
        return
    tid = app.tid()
    try:
        KM.record("Viewed Homepage", {"tid": tid, "who": "no one"})
    except InvalidEvent:
        return
    app.ledger.line("bad", tid, "LeakedPerson", json.dumps(
        "an anonymous request recorded for someone (a previous request's person?)"))


def web_request(app: App, rng: random.Random, kind: str, who: str, start: Callable,
                resume: Callable[[Callable[[], None]], None]) -> None:
    """What the app does for a request of ``kind``; ``start()`` begins the answer and
    ``resume(fn)`` runs ``fn`` later, as the streamed body."""
    from kmagent import KM
    if kind in ("login", "raises"):
        KM.identify(who)  # a sign-in, or the last thing a request that fails does
    if kind == "raises":
        raise RuntimeError("the app failed")
    start()
    expected = None if kind in ("anonymous", "stream_anonymous") else who
    if kind.startswith("stream"):
        resume(lambda: web_record(app, rng, expected))
    else:
        web_record(app, rng, expected)


def web_hook(headers: Callable[[str], str | None]) -> str | None:
    """The identify hook: the person a "hook" or "stream" request names in X-User."""
    return headers("x-user")


def web_visits(app: App, visit: Callable[[str, str, int], None], share: float) -> None:
    """Requests of every kind, one after another, until the app's end."""
    rng = random.Random(f"{app.seed}/{app.proc}/visits")
    n = 0
    while app.running():
        kind = rng.choice(WEB_KINDS)
        visit(kind, f"web-{kind}-{os.getpid()}-{n}", n)
        n += 1
        app.pace(rng, share)


@pattern("web_wsgi", "WSGIMiddleware, a server with one thread: every kind of request")
def pat_web_wsgi(app: App) -> None:
    import http.client
    import wsgiref.simple_server
    from kmagent import KM
    from kmagent.web import WSGIMiddleware
    construct(app, "KM.init()", lambda: KM.init(config=app.config))

    def raw(environ, start_response):
        kind, who = environ["HTTP_X_KIND"], environ["HTTP_X_WHO"]
        rng = random.Random(f"{app.seed}/{app.proc}/{environ['HTTP_X_N']}")
        chunks: list[Callable[[], None]] = []
        web_request(app, rng, kind, who, lambda: start_response("200 OK", []),
                    chunks.append)

        def body():
            yield b"first"
            for chunk in chunks:
                chunk()
                yield b" more"
        return body()

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def log_exception(self, *args) -> None:  # "raises" is on purpose
            pass
    hook = WSGIMiddleware(raw, identify=lambda e: web_hook(
        lambda name: e.get("HTTP_" + name.upper().replace("-", "_"))))
    server = wsgiref.simple_server.make_server("127.0.0.1", 0, hook, handler_class=Quiet)
    server.handle_error = lambda *args: None
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def visit(kind: str, who: str, n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
        headers = {"X-Kind": kind, "X-Who": who, "X-N": str(n)}
        if kind in ("hook", "stream"):
            headers["X-User"] = who
        try:
            conn.request("GET", "/", headers=headers)
            conn.getresponse().read()
        except (http.client.HTTPException, OSError):
            pass  # "raises" answers 500 or drops the connection
        finally:
            conn.close()
    try:
        web_visits(app, visit, 1.0)
    finally:
        server.shutdown()


@pattern("web_asgi", "ASGIMiddleware: concurrent requests in one loop, sync work in a pool")
def pat_web_asgi(app: App) -> None:
    import contextvars
    from kmagent import KM
    from kmagent.web import ASGIMiddleware
    construct(app, "KM.init()", lambda: KM.init(config=app.config))

    async def raw(scope, receive, send):
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        rng = random.Random(f"{app.seed}/{app.proc}/{headers['x-n']}")
        later: list[Callable[[], None]] = []
        loop = asyncio.get_running_loop()

        def request() -> None:
            web_request(app, rng, headers["x-kind"], headers["x-who"], lambda: None,
                        later.append)
        if rng.random() < 0.5:  # a sync endpoint, in a thread pool as Starlette runs it
            await loop.run_in_executor(None, contextvars.copy_context().run, request)
        else:
            request()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for chunk in later:
            await asyncio.sleep(rng.random() / 100)  # other requests run meanwhile
            chunk()
        await send({"type": "http.response.body", "body": b"done"})

    middleware = ASGIMiddleware(raw, identify=lambda scope: web_hook(
        lambda name: dict(scope["headers"]).get(name.encode(), b"").decode() or None))

    async def one(kind: str, who: str, n: int) -> None:
        headers = {"x-kind": kind, "x-who": who, "x-n": str(n)}
        if kind in ("hook", "stream"):
            headers["x-user"] = who
        scope = {"type": "http", "path": "/", "method": "GET",
                 "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}

        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(message):
            pass
        try:
            await middleware(scope, receive, send)
        except RuntimeError:
            pass  # "raises"

    async def main() -> None:
        pending: set[asyncio.Task] = set()

        def visit(kind: str, who: str, n: int) -> None:
            pending.add(asyncio.ensure_future(one(kind, who, n)))
        rng = random.Random(f"{app.seed}/{app.proc}/visits")
        n = 0
        while app.running():
            kind = rng.choice(WEB_KINDS)
            visit(kind, f"web-{kind}-{os.getpid()}-{n}", n)
            n += 1
            await asyncio.sleep(min(0.25, rng.expovariate(max(1.0, app.rate))))
            pending = {task for task in pending if not task.done()}
        await asyncio.gather(*pending)
    asyncio.run(main())


def _fork_pattern(app: App, fresh: bool) -> None:
    rng = app.rng
    client = new_client(app)
    api = ClientAPI(client)
    if rng.random() < 0.5:  # a thread recording in the parent while it forks
        helper = threading.Thread(
            target=lambda: run_threads(app, 1, lambda i, trng: app.loop(api, trng, 0.3)),
            daemon=True)
        helper.start()

    def child(child_app: App) -> None:
        if fresh:
            if child_app.rng.random() < 0.5:
                client.close()
            child_app.loop(ClientAPI(new_client(child_app)))
        else:
            child_app.loop(api)
    children = []
    forks = rng.randint(1, 3)
    while app.running():
        app.emit(api, rng)
        if forks and rng.random() < 0.02:
            children.append(fork_child(app, f"c{len(children)}", child))
            forks -= 1
        app.pace(rng, 0.7)
    reap(children, app.end + 60)


@pattern("fork_inherited", "fork; parent and child go on with the inherited Client")
def pat_fork_inherited(app: App) -> None:
    _fork_pattern(app, fresh=False)


@pattern("fork_new_client", "fork; the child makes a new Client")
def pat_fork_new_client(app: App) -> None:
    _fork_pattern(app, fresh=True)


@pattern("fork_parent_exits", "fork; the parent exits at once, the child goes on")
def pat_fork_parent_exits(app: App) -> None:
    rng = app.rng
    client = new_client(app)
    api = ClientAPI(client)
    for _ in range(rng.randint(1, 30)):
        app.emit(api, rng)

    def child(child_app: App) -> None:
        if child_app.rng.random() < 0.3:
            os.setsid()  # a daemonizing app
        child_app.loop(api if child_app.rng.random() < 0.7 else ClientAPI(new_client(child_app)))
    fork_child(app, "c", child)
    if rng.random() < 0.3:
        app.done()
        os._exit(0)
    # else: return, and the parent's interpreter exits normally


@pattern("gunicorn_preload", "master makes a Client, forks workers, gets SIGKILLed")
def pat_gunicorn(app: App) -> None:
    rng = app.rng
    client = new_client(app)
    api = ClientAPI(client)
    for _ in range(rng.randint(0, 20)):
        app.emit(api, rng)

    def worker(child_app: App) -> None:
        n = child_app.rng.randint(1, 2)
        run_threads(child_app, n, lambda i, trng: child_app.loop(api, trng, 1 / n))
    workers = [fork_child(app, f"w{i}", worker) for i in range(rng.randint(2, 3))]
    app.register("master")  # records no more: the engine's stall watch leaves it be
    time.sleep(max(0.0, (app.end - time.time()) * rng.uniform(0.1, 0.6)))
    app.selfkill()
    reap(workers, app.end + 60)  # not reached


_APP_CLIENT = None  # what a multiprocessing "fork" child inherits


def mp_worker(spec: dict[str, Any], label: str) -> None:
    app = App(spec, label, role="mp")
    try:
        inherited = _APP_CLIENT
        api = ClientAPI(inherited if inherited is not None and app.rng.random() < 0.7
                        else new_client(app))
        app.loop(api)
    except AppOver:
        pass
    except BaseException:
        app.crash()
        raise
    app.done()


def mp_task(spec: dict[str, Any], label: str, count: int) -> int:
    app = App(spec, label, role="pool")
    try:
        inherited = _APP_CLIENT
        api = ClientAPI(inherited if inherited is not None else new_client(app))
        for _ in range(count):
            if not app.running():
                break
            app.emit(api, app.rng)
            app.pace(app.rng)
    except AppOver:
        pass
    except BaseException:
        app.crash()
        raise
    app.done()
    return count


def _mp_pattern(app: App, method: str) -> None:
    import multiprocessing
    global _APP_CLIENT
    rng = app.rng
    _APP_CLIENT = new_client(app)
    api = ClientAPI(_APP_CLIENT)
    for _ in range(rng.randint(0, 10)):
        app.emit(api, rng)
    ctx = multiprocessing.get_context(method)
    n = rng.randint(2, 3)
    spec = app.child_spec()
    if rng.random() < 0.6:
        workers = [ctx.Process(target=mp_worker, args=(spec, f"mp{i}")) for i in range(n)]
        for worker in workers:
            worker.start()
        app.loop(api, rng, 0.5)
        for worker in workers:
            worker.join(max(1.0, app.end - time.time() + 60))
    else:
        with ctx.Pool(n) as pool:
            tasks = [(spec, f"pool{i}", rng.randint(5, 40)) for i in range(3 * n)]
            result = pool.starmap_async(mp_task, tasks)
            app.loop(api, rng, 0.5)
            try:
                result.get(max(1.0, app.end - time.time() + 20))
            except multiprocessing.TimeoutError:
                # A Pool never finishes a task whose worker died (multiprocessing's way);
                # the engine does not kill Pool workers, so this is worth a look.
                app.ledger.line("note", "Pool", json.dumps("tasks unfinished 20 s after the end"))
                pool.terminate()
            else:
                pool.close()
            pool.join()


@pattern("mp_fork", "multiprocessing workers, fork start method")
def pat_mp_fork(app: App) -> None:
    _mp_pattern(app, "fork")


@pattern("mp_forkserver", "multiprocessing workers, forkserver start method")
def pat_mp_forkserver(app: App) -> None:
    _mp_pattern(app, "forkserver")


@pattern("mp_spawn", "multiprocessing workers, spawn start method")
def pat_mp_spawn(app: App) -> None:
    _mp_pattern(app, "spawn")


SIGNALLER = """
import os, signal, sys, time
target, interval, end = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
while time.time() < end and os.getppid() == target:
    try:
        os.kill(target, signal.SIGUSR1)
    except ProcessLookupError:
        break
    time.sleep(interval)
"""


@pattern("signal_handler", "record() in SIGALRM/SIGUSR1 handlers while main records")
def pat_signal_handler(app: App) -> None:
    rng = app.rng
    client = new_client(app)
    api = ClientAPI(client)
    handler_api = api if rng.random() < 0.7 else ClientAPI(new_client(app))
    hrng = random.Random(f"{app.seed}/{app.proc}/handler")

    def handler(signum: int, frame: object) -> None:
        if app.running():
            app.emit(handler_api, hrng)
    signal.signal(signal.SIGALRM, handler)
    signal.signal(signal.SIGUSR1, handler)
    interval = rng.uniform(0.003, 0.03)
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
    signaller = subprocess.Popen([sys.executable, "-c", SIGNALLER, str(os.getpid()),
                                  str(rng.uniform(0.003, 0.03)), str(app.end)])
    if rng.random() < 0.5:
        helper = threading.Thread(
            target=lambda: run_threads(app, 1, lambda i, trng: app.loop(api, trng, 0.3)),
            daemon=True)
        helper.start()
    app.loop(api, rng)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signaller.wait(30)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


@pattern("signal_raises", "a signal handler raises into the main thread's record()")
def pat_signal_raises(app: App) -> None:
    rng = app.rng
    api = ClientAPI(new_client(app))

    def handler(signum: int, frame: object) -> None:
        if armed[0]:
            raise Interrupted()
    # Armed only while the main thread is inside a call: it interrupts kmagent, not us.
    armed = [False]
    signal.signal(signal.SIGALRM, handler)
    interval = rng.uniform(0.002, 0.02)
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
    n = rng.randint(1, 2)
    helper = threading.Thread(
        target=lambda: run_threads(app, n, lambda i, trng: app.loop(api, trng, 0.5 / n)),
        daemon=True)
    helper.start()
    while True:
        try:
            while app.running():
                armed[0] = True
                app.emit(api, rng)
                armed[0] = False
                app.pace(rng, 0.5)
            break
        except Interrupted:
            armed[0] = False
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    helper.join(60)


# -- Kissmetrics' own libraries, writing the query logs kmagent takes over ([km_log]) --
# Each writes as its library does: open, append one record, close; km 1.3.0, km.php and
# kissmetrics-php take no lock, kmts takes an flock. A record is ledgered "ok" once its
# write() returned whole: from then on it is kmagent's to deliver.
KM_LOG_DIRS = ("km", "kmts", "kmphp", "kissmetrics_php")


def km_log_dir(workdir: Path, style: str) -> Path:
    return workdir / "km-logs" / style


def _php_string(text: str) -> str:
    return f's:{len(text.encode())}:"{text}";'


def km_log_record(style: str, kind: str, fields: dict[str, str]) -> bytes:
    """One record as the library ``style`` logs it, newline included."""
    if style == "kissmetrics_php":  # its Delayed transport: PHP serialize()d arrays
        inner = "".join(_php_string(k) + _php_string(v) for k, v in fields.items())
        record = (f"a:1:{{i:0;a:2:{{i:0;{_php_string(kind)}i:1;"
                  f"a:{len(fields)}:{{{inner}}}}}}}")
    else:
        from urllib.parse import quote
        record = f"/{kind}?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}"
                                         for k, v in fields.items())
    return record.encode() + b"\n"


def km_log_writer(app: App, style: str) -> None:
    import fcntl
    rng = app.rng
    name = "kissmetrics_query.log" if style in ("kmphp", "kissmetrics_php") \
        else "kissmetrics_production_query.log"
    path = km_log_dir(app.workdir, style) / name
    while app.running():
        tid = app.tid()
        person = f"person{rng.randrange(50)}"
        kind = rng.choice("eeees")
        fields = {"_k": API_KEY, "_p": person, "tid": tid, "who": person,
                  "_t": str(int(time.time())), "_d": "1"}
        if kind == "e":
            fields.update({"_n": rng.choice(EVENT_NAMES), "pad": "z" * rng.randrange(200)})
        record = km_log_record(style, kind, fields)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if style == "kmts":
                    fcntl.flock(fd, fcntl.LOCK_EX)
                written = os.write(fd, record)
            finally:
                os.close(fd)
        except OSError as exc:
            app.ledger.line("raised", tid, "OSError", json.dumps(str(exc)))
            app.pace(rng)
            continue
        if written == len(record):
            app.ledger.line("ok", tid)
        else:
            app.ledger.line("raised", tid, "short_write", json.dumps(f"{written} bytes"))
        app.pace(rng)


for _style in KM_LOG_DIRS:
    pattern(f"km_log_{_style}", f"{_style}-style writer of a Kissmetrics query log",
            weight=0.5)(lambda app, style=_style: km_log_writer(app, style))


@pattern("cli_commands", "kmagent record/set/alias commands, ledgered on exit 0")
def pat_cli(app: App) -> None:
    rng = app.rng
    base = [sys.executable, "-m", "kmagent"]
    while app.running():
        tid = app.tid()
        kind = rng.choice("eeeesa")
        person = f"cli{rng.randrange(20)}"
        if kind == "e":
            args = ["record", person, rng.choice(EVENT_NAMES), f"tid={tid}", f"who={person}",
                    f"pad={'y' * rng.randrange(100)}"]
        elif kind == "s":
            args = ["set", person, f"tid={tid}", f"who={person}", "plan=Pro"]
        else:
            args = ["alias", f"user {tid}", f"alias-{tid}"]
        try:
            done = subprocess.run(base + args + ["--config", app.config], capture_output=True,
                                  text=True, timeout=60)
        except subprocess.TimeoutExpired:
            app.ledger.line("bad", tid, "hang", json.dumps(f"kmagent {args[0]} hung for 60 s"))
            continue
        if TRACEBACK in done.stderr:
            app.ledger.line("bad", tid, "traceback", json.dumps(done.stderr))
        elif done.returncode == 0:
            app.ledger.line("ok", tid)
        elif done.returncode in (1, 74):
            app.ledger.line("raised", tid, f"exit{done.returncode}", json.dumps(done.stderr))
        else:
            app.ledger.line("bad", tid, f"exit{done.returncode}", json.dumps(done.stderr))
        app.pace(rng, 0.05)


def producer_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    try:
        app = App(spec)
    except BaseException:
        traceback.print_exc()
        return 3
    try:
        PATTERNS[spec["pattern"]].fn(app)
    except ChildExit:
        return 0  # a forked child, done: exit normally
    except AppOver:
        pass
    except BaseException:
        app.crash()
        return 3
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    app.done()
    return 0


# ----------------------------------------------------------------------------------
# The engine side
# ----------------------------------------------------------------------------------


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def alive(pid: int, start: str | None) -> bool:
    """Running (not a zombie), and the same process that registered."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    rest = text[text.rindex(")") + 2:].split()
    return rest[0] not in ("Z", "X") and (start is None or rest[19] == start)


def dump_stacks(pid: int) -> str:
    """py-spy's dump of a hung process (if installed); then faulthandler's (SIGABRT
    with PYTHONFAULTHANDLER set writes every thread's stack to its log)."""
    parts = []
    spy = py_spy()
    if spy:
        try:
            out = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True,
                                 text=True, timeout=30)
            lines = (out.stdout or out.stderr).splitlines()
            if len(lines) > 120:  # a deep recursion (nested signal handlers) says it early
                lines = lines[:80] + [f"... {len(lines) - 110} lines ..."] + lines[-30:]
            parts.append("py-spy dump:\n" + "\n".join(lines))
        except (subprocess.TimeoutExpired, OSError) as exc:
            parts.append(f"py-spy dump failed: {exc}")
    else:
        parts.append("(py-spy is not installed: `pip install py-spy` for a stack dump)")
    return "\n".join(parts)


def kill_hung(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGABRT)  # faulthandler prints every thread's stack first
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def code_version() -> str:
    """Which kmagent this run tests: the spool code changes under active work."""
    import hashlib

    import kmagent
    where = Path(kmagent.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(where.rglob("*.py")):
        digest.update(path.read_bytes())
    git = ["git", "-C", str(where.parent)]
    try:
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "kmagent"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        head, dirty = "", ""
    state = f"git {head}" + (" + uncommitted changes" if dirty else "") if head else "no git"
    return f"kmagent from {where} ({state}; sources sha256 {digest.hexdigest()[:12]})"


def tid_of(target: str) -> str | None:
    parts = urlsplit(target)
    params = parse_qsl(parts.query, keep_blank_values=True)
    values = dict(params)
    if "tid" in values:
        return values["tid"]
    name = values.get("_n", "")
    if parts.path.lstrip("/") == "a" and name.startswith("alias-"):
        return name[len("alias-"):]
    return None


@dataclass
class Result:
    seed: int
    backend: str
    seconds: float
    command: str
    failures: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    workdir: str = ""
    took: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def headline(self) -> str:
        verdict = "ok" if self.ok else f"FAILED ({len(self.failures)} failures)"
        return (f"torture seed {self.seed} backend {self.backend}: {verdict} in "
                f"{self.took:.1f} s; rerun: {self.command}")

    def report(self) -> str:
        lines = [self.headline()]
        lines += ["  " + line for line in self.summary]
        if self.failures:
            lines.append(f"  workdir (logs, ledgers, spool): {self.workdir}")
            for n, failure in enumerate(self.failures, 1):
                body = failure.replace("\n", "\n      ")
                lines.append(f"  FAILURE {n} [seed {self.seed} {self.backend}]: {body}")
        return "\n".join(lines)


# requests reads these (proxies, CA bundles): none of the machine's may apply to a test.
MACHINE_NETWORK_ENV = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                       "all_proxy", "NO_PROXY", "no_proxy", "REQUESTS_CA_BUNDLE",
                       "CURL_CA_BUNDLE")

OPERATOR_COMMANDS: list[tuple[float, list[str]]] = [
    (3, ["status", "--json"]),
    (1, ["status"]),
    (2, ["flush", "--timeout", "2"]),
    (1, ["dead", "list"]),
    (1, ["dead", "list", "--json"]),
    (1, ["dead", "retry", "--all"]),
    (1, ["export", "-o", "{workdir}/export.jsonl"]),
    (1, ["export", "--dead", "-o", "{workdir}/export-dead.jsonl"]),
    (1, ["reload"]),  # SIGHUP, then waits for the daemon's answer (1: none running)
]


class Daemon:
    """The `kmagent run` process: started, killed and restarted by faults."""

    def __init__(self, run: "Run") -> None:
        self.run = run
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None
        self.count = 0
        self.lock = threading.RLock()
        self.expected_exit: dict[int, str] = {}

    def start(self) -> None:
        with self.lock:
            if self.proc is not None:
                return
            self.count += 1
            self.log = self.run.workdir / "logs" / f"daemon-{self.count}.log"
            with open(self.log, "w") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "kmagent", "run", "--config", str(self.run.config)],
                    stdout=out, stderr=subprocess.STDOUT, env=self.run.env, cwd=self.run.workdir)
            self.run.note(f"daemon {self.count} started (pid {self.proc.pid})")

    def stop(self, sig: int) -> None:
        """Signal the daemon and wait: SIGTERM must exit 0 within shutdown_timeout."""
        with self.lock:
            proc, log = self.proc, self.log
            if proc is None:
                return
            self.proc = None
            early = proc.poll()
            if early is not None:
                self.run.fail(f"daemon {self.count} (pid {proc.pid}) exited by itself with "
                              f"status {early}:\n{tail(log)}")
                self._check_log(log)
                return
            if sig != signal.SIGKILL and not self.wait_ready(proc, log):
                return
            proc.send_signal(sig)
            limit = 5 if sig == signal.SIGKILL else self.run.shutdown_timeout + 15
            try:
                code = proc.wait(limit)
            except subprocess.TimeoutExpired:
                stacks = dump_stacks(proc.pid)
                kill_hung(proc.pid)
                proc.wait(10)
                self.run.fail(f"hang: daemon {self.count} (pid {proc.pid}) did not exit "
                              f"within {limit} s of {signal.Signals(sig).name}\n{stacks}\n"
                              f"{tail(log)}")
                return
            if sig == signal.SIGTERM and code != 0:
                self.run.fail(f"daemon {self.count} exited {code} after SIGTERM "
                              f"(expected 0):\n{tail(log)}")
            self._check_log(log)

    def wait_ready(self, proc: subprocess.Popen, log: Path, limit: float = 30.0) -> bool:
        """Until the daemon has its handlers (it logs that it ships, or whom it waits
        for): a signal before that meets Python's defaults, which is no finding."""
        deadline = time.time() + limit
        while time.time() < deadline:
            text = log.read_text(errors="replace")
            if "shipping " in text or "being shipped by" in text:
                return True
            if proc.poll() is not None:
                self.run.fail(f"daemon {self.count} (pid {proc.pid}) exited by itself with "
                              f"status {proc.returncode} while starting:\n{tail(log)}")
                return False
            time.sleep(0.05)
        stacks = dump_stacks(proc.pid)
        kill_hung(proc.pid)
        proc.wait(10)
        self.run.fail(f"hang: daemon {self.count} (pid {proc.pid}) not shipping (nor waiting "
                      f"for the lock) {limit:g} s after it started\n{stacks}\n{tail(log)}")
        return False

    def signal(self, sig: int) -> None:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                return
            if self.wait_ready(self.proc, self.log):
                self.proc.send_signal(sig)
            else:
                self.proc = None

    def _check_log(self, log: Path | None) -> None:
        text = log.read_text(errors="replace") if log else ""
        if TRACEBACK in text or "Fatal Python error" in text:
            self.run.fail(f"daemon log {log.name} shows a traceback:\n{text[-4000:]}")


class Run:
    """One torture run on one backend."""

    def __init__(self, seed: int, seconds: float, backend: str, *,
                 patterns: list[str] | None = None, faults: list[str] | None = None,
                 workdir: Path | None = None, short: bool = False, verbose: bool = False,
                 command: str | None = None) -> None:
        self.seed = seed
        self.seconds = seconds
        self.backend = backend
        self.short = short
        self.verbose = verbose
        self.rng = random.Random(f"torture/{seed}/{backend}")
        self.explicit_patterns = patterns
        self.explicit_faults = faults
        self.command = command or self.rerun_command()
        base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kmagent-torture-"))
        self.workdir = base / backend
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        for sub in ("ledger", "procs", "logs", "specs", "state"):
            (self.workdir / sub).mkdir(parents=True)
        self.result = Result(seed, backend, seconds, self.command, workdir=str(self.workdir))
        self.failures = self.result.failures
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self.killed: set[tuple[int, str | None]] = set()
        self.kills = collections.Counter()
        self.fired: collections.Counter = collections.Counter()
        self.top: list[tuple[str, subprocess.Popen, Path]] = []
        self.ops = collections.Counter()
        self.op_threads: list[threading.Thread] = []
        self.t0 = time.time()
        self.stopping = threading.Event()
        # A hang never ends; how long to wait before calling it one only costs time. The
        # machine may be shared: a busy one gets longer.
        busy = max(0.0, os.getloadavg()[0] - (os.cpu_count() or 1))
        self.hang_grace = (12.0 if short else 20.0) + min(30.0, 2 * busy)
        self.stall_limit = 15.0 + min(30.0, 2 * busy)
        self.stalled: set[int] = set()
        self.watch_stop = threading.Event()
        self.shutdown_timeout = 3.0

    def rerun_command(self) -> str:
        cmd = (f"python tests/torture.py --seed {self.seed} --backend {self.backend} "
               f"--seconds {self.seconds:g}")
        if self.explicit_patterns is not None:
            cmd += f" --patterns {','.join(self.explicit_patterns)}"
        if self.explicit_faults is not None:
            cmd += f" --faults {','.join(self.explicit_faults) or 'none'}"
        if self.short:
            cmd += " --short"
        return cmd

    # -- bookkeeping
    def fail(self, text: str) -> None:
        with self._lock:
            self.failures.append(text)
        if self.verbose:
            print(f"[{time.time() - self.t0:6.1f}] FAILURE: {text.splitlines()[0]}",
                  file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        with self._lock:
            self.notes.append(f"{time.time() - self.t0:6.1f} {text}")
        if self.verbose:
            print(f"[{time.time() - self.t0:6.1f}] {text}", file=sys.stderr, flush=True)

    # -- plan
    def plan(self) -> None:
        rng = self.rng
        self.concurrency = rng.choice([4, 8, 8, 16, "auto"])
        self.durability = rng.choice(["normal"] * 5 + ["full"])
        self.drain = rng.choice(["daemon", "flush"])
        if self.explicit_patterns is not None:
            chosen = list(self.explicit_patterns)
        else:
            names = sorted(PATTERNS)
            weights = [PATTERNS[n].weight for n in names]
            k = rng.randint(3, 5) if self.short else rng.randint(4, 8)
            chosen = []
            while len(chosen) < min(k, len(names)):
                pick = rng.choices(names, weights)[0]
                if pick not in chosen:
                    chosen.append(pick)
        self.patterns = chosen
        if self.explicit_faults is not None:
            self.faults = list(self.explicit_faults)
        else:
            self.faults = sorted(FAULTS)
        # Producers: a few slots, each a sequence of apps back to back; every chosen
        # pattern gets at least one app.
        chaos = self.seconds
        slots = 3 if self.short else 4
        order = list(chosen)
        rng.shuffle(order)
        self.schedule: list[dict[str, Any]] = []
        n = 0
        for slot in range(slots):
            at = rng.uniform(0, min(1.0, chaos * 0.1))
            while at < chaos - 1.5:
                duration = min(chaos - at, rng.uniform(2.0, max(2.5, chaos / 2.5)))
                name = order[n % len(order)] if n < len(order) else rng.choice(chosen)
                self.schedule.append({"proc": f"p{n}", "pattern": name, "at": at,
                                      "duration": duration,
                                      "rate": round(rng.uniform(20, 80), 1)})
                n += 1
                at += duration + rng.uniform(0, 1.0)
        # Faults: two lanes; operators: a third.
        self.lanes: dict[str, list[tuple[float, str]]] = {}
        for lane in ("process", "host", "disk"):
            names = [f for f in self.faults if FAULTS[f].lane == lane]
            events, at = [], rng.uniform(0.3, 1.5)
            while names and at < chaos - 0.5:
                events.append((at, rng.choices(names, [FAULTS[f].weight for f in names])[0]))
                at += rng.uniform(0.5, 2.0)
            self.lanes[lane] = events
        ops, at = [], rng.uniform(0.2, 1.0)
        while at < chaos - 0.5:
            ops.append((at, rng.choices([c for _, c in OPERATOR_COMMANDS],
                                        [w for w, _ in OPERATOR_COMMANDS])[0]))
            at += rng.uniform(0.4, 2.0)
        self.operator_plan = ops

    def mount_disk(self) -> Path | None:
        """A filesystem of the spool's own for the disk lane (a tmpfs, so root only);
        without one the disk faults are left out."""
        if not any(FAULTS[f].lane == "disk" for f in self.faults):
            return None
        disk = self.workdir / "disk"
        disk.mkdir()
        if os.geteuid() != 0 or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m", "tmpfs", str(disk)],
                capture_output=True).returncode != 0:
            self.note("no tmpfs for the spool (not root?): disk faults left out")
            self.faults = [f for f in self.faults if FAULTS[f].lane != "disk"]
            self.lanes["disk"] = []
            return None
        return disk

    def write_config(self) -> None:
        home = self.disk if self.disk is not None else self.workdir
        self.spool = home / ("spool.db" if self.backend == "sqlite" else "spool.jsonl.d")
        concurrency = (f'"{self.concurrency}"' if isinstance(self.concurrency, str)
                       else self.concurrency)
        text = "\n".join([
            f'api_key = "{API_KEY}"',
            f'endpoint = "{self.host.url}"',
            "[spool]",
            f'backend = "{self.backend}"',
            f'path = "{self.spool}"',
            f'durability = "{self.durability}"',
            "rotate_bytes = 65536",
            "[ship]",
            f"concurrency = {concurrency}",
            "max_concurrency = 16",
            "max_backoff = 1",
            f"shutdown_timeout = {self.shutdown_timeout:g}",
            "connect_timeout = 2",
            "read_timeout = 3",
            "[km_log]",
            "dirs = [" + ", ".join(f'"{km_log_dir(self.workdir, style)}"'
                                   for style in KM_LOG_DIRS) + "]",
            "[log]",
            'level = "info"',
        ]) + "\n"
        for style in KM_LOG_DIRS:
            km_log_dir(self.workdir, style).mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "config.toml"
        self.config.write_text(text)
        self.config.chmod(0o600)
        env = os.environ.copy()
        for name in MACHINE_NETWORK_ENV:
            env.pop(name, None)
        env["KMAGENT_CONFIG"] = str(self.config)
        env["XDG_STATE_HOME"] = str(self.workdir / "state")
        env["PYTHONFAULTHANDLER"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + (
            [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.env = env

    # -- producers
    def launch(self, item: dict[str, Any]) -> None:
        spec = {"seed": self.seed, "config": str(self.config), "workdir": str(self.workdir),
                "proc": item["proc"], "pattern": item["pattern"], "rate": item["rate"],
                "end": time.time() + item["duration"], "lineage": []}
        path = self.workdir / "specs" / f"{item['proc']}.json"
        path.write_text(json.dumps(spec))
        log = self.workdir / "logs" / f"{item['proc']}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, str(HERE), "--producer", str(path)],
                                    stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=self.workdir)
        self.top.append((item["proc"], proc, log))
        self.note(f"{item['proc']} {item['pattern']} started (pid {proc.pid}, "
                  f"{item['duration']:.1f} s, {item['rate']}/s)")

    def registry(self) -> list[dict[str, Any]]:
        out = []
        procs = self.workdir / "procs"
        for path in procs.glob("*.json"):
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            pid = info["pid"]
            info["done"] = (procs / f"{pid}.done").exists()
            info["selfkill"] = (procs / f"{pid}.selfkill").exists()
            out.append(info)
        return out

    def was_killed(self, info: dict[str, Any]) -> bool:
        return info["selfkill"] or (info["pid"], info["start"]) in self.killed

    def killed_pids(self, reg: list[dict[str, Any]]) -> set[int]:
        return {i["pid"] for i in reg if self.was_killed(i)}

    def live_apps(self) -> list[dict[str, Any]]:
        """Victims for kill_producer: every app process but Pool workers (a Pool never
        finishes a task whose worker died: multiprocessing's limit, not kmagent's)."""
        return [i for i in self.registry()
                if not i["done"] and i["role"] != "pool" and i["end"] > time.time() + 0.3
                and alive(i["pid"], i["start"])]

    def silent_for(self, info: dict[str, Any]) -> float:
        """Seconds since the app process last wrote its ledger (or registered)."""
        last = 0.0
        for path in (self.workdir / "ledger" / f"{info['pid']}.ledger",
                     self.workdir / "procs" / f"{info['pid']}.json"):
            try:
                last = max(last, path.stat().st_mtime)
            except OSError:
                pass
        return time.time() - last

    def kill(self, info: dict[str, Any]) -> None:
        silent = self.silent_for(info)
        if info["role"] not in ("pool", "master") and silent > 8 + self.stall_limit - 15:
            # Hung already: say so before the kill hides it.
            self.stalled.add(info["pid"])
            self.fail(f"hang: app process {info['proc']} ({info['pattern']}, pid "
                      f"{info['pid']}) had recorded nothing for {silent:.0f} s when a fault "
                      f"came to kill it\n{dump_stacks(info['pid'])}")
        with self._lock:
            self.killed.add((info["pid"], info["start"]))
        try:
            os.kill(info["pid"], signal.SIGKILL)
        except ProcessLookupError:
            return
        self.kills[info["pattern"]] += 1
        self.note(f"SIGKILL {info['proc']} ({info['pattern']}, pid {info['pid']})")

    def watch_stalls(self) -> None:
        """An app process whose ledger stops growing before its end is hung (a hang
        may hold a lock that stalls everyone else): report it with its stacks, then
        kill it, so that the rest of the run still means something."""
        seen: dict[int, tuple[int, float]] = {}
        while not self.watch_stop.wait(1.0):
            now = time.time()
            for info in self.registry():
                pid = info["pid"]
                if (info["role"] in ("pool", "master") or info["done"] or now > info["end"]
                        or (pid, info["start"]) in self.killed or pid in self.stalled
                        or not alive(pid, info["start"])):
                    continue
                try:
                    size = (self.workdir / "ledger" / f"{pid}.ledger").stat().st_size
                except OSError:
                    size = -1
                before = seen.get(pid)
                if before is None or before[0] != size:
                    seen[pid] = (size, now)
                    continue
                if now - before[1] < self.stall_limit:
                    continue
                self.stalled.add(pid)
                stacks = dump_stacks(pid)
                self.fail(f"hang: app process {info['proc']} ({info['pattern']}, pid {pid}) "
                          f"recorded nothing for {now - before[1]:.0f} s before its end "
                          f"(killed now)\n{stacks}")
                with self._lock:
                    self.killed.add((pid, info["start"]))
                kill_hung(pid)

    # -- lanes
    def lane(self, events: list[tuple[float, str]], seed_label: str) -> None:
        rng = random.Random(f"{self.seed}/{self.backend}/{seed_label}")
        for at, name in events:
            if self.stopping.wait(max(0.0, self.t0 + at - time.time())):
                return
            self.note(f"fault {name}")
            with self._lock:
                self.fired[name] += 1
            try:
                FAULTS[name].fn(self, rng)
            except Exception:
                self.fail(f"the torture engine's fault {name} crashed:\n{traceback.format_exc()}")

    def operators(self) -> None:
        for n, (at, args) in enumerate(self.operator_plan):
            if self.stopping.wait(max(0.0, self.t0 + at - time.time())):
                return
            args = [a.format(workdir=self.workdir) for a in args]
            # Operators do not wait for each other: a flush may take a while.
            thread = threading.Thread(target=self.operator, args=(args,), daemon=True)
            thread.start()
            self.op_threads.append(thread)

    def kmagent(self, args: list[str], timeout: float, what: str = "operator") -> tuple[int | None, str, str]:
        """Run a kmagent command; a traceback or a hang is a failure."""
        cmd = [sys.executable, "-m", "kmagent", *args, "--config", str(self.config)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, cwd=self.workdir)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stacks = dump_stacks(proc.pid)
            kill_hung(proc.pid)
            out, err = proc.communicate(timeout=10)
            self.fail(f"hang: {what} `kmagent {' '.join(args)}` still running after "
                      f"{timeout:g} s\n{stacks}\n{err[-3000:]}")
            return None, out, err
        if TRACEBACK in err or "Fatal Python error" in err:
            self.fail(f"{what} `kmagent {' '.join(args)}` exited {proc.returncode} with a "
                      f"traceback:\n{err[-4000:]}")
        return proc.returncode, out, err

    def operator(self, args: list[str]) -> None:
        timeout = 60.0 if args[0] == "flush" else 30.0
        code, out, err = self.kmagent(args, timeout)
        name = " ".join(a for a in args if not a.startswith(str(self.workdir)))
        with self._lock:
            self.ops[f"{name} -> {code}"] += 1
        if code == 0 and "--json" in args:
            try:
                json.loads(out)
            except ValueError:
                self.fail(f"operator `kmagent {name}` printed output that is not JSON: {out[:500]!r}")
        if code not in (0, None) and not (args[0] == "flush" and code == 1) and not (
                args[0] == "export" and code == 2):
            self.note(f"operator `kmagent {name}` exited {code}: {err.strip()[-300:]}")

    def status(self) -> dict[str, Any] | None:
        code, out, err = self.kmagent(["status", "--json"], 30, "final check")
        if code != 0:
            self.fail(f"`kmagent status --json` exited {code}: {err[-2000:]}")
            return None
        return json.loads(out)

    # -- the run
    def execute(self) -> Result:
        from kmagent.testhost import StandInHost
        started = time.monotonic()
        self.plan()
        self.host = StandInHost(seed=zlib.crc32(f"{self.seed}/{self.backend}".encode()))
        with self.host:
            self.disk = self.mount_disk()
            self.write_config()
            self.daemon = Daemon(self)
            self.t0 = time.time()
            try:
                self.chaos()
                self.finish()
            finally:
                self.cleanup()
            try:
                self.judge()
            finally:
                if self.disk is not None:
                    subprocess.run(["umount", "-l", str(self.disk)], capture_output=True)
        self.result.took = time.monotonic() - started
        return self.result

    def chaos(self) -> None:
        if self.rng.random() < 0.8:
            self.daemon.start()  # else: the first fault of the process lane starts one
        lanes = [threading.Thread(target=self.lane, args=(events, lane), daemon=True)
                 for lane, events in self.lanes.items()]
        lanes.append(threading.Thread(target=self.operators, daemon=True))
        watcher = threading.Thread(target=self.watch_stalls, daemon=True)
        watcher.start()
        for thread in lanes:
            thread.start()
        for item in sorted(self.schedule, key=lambda i: i["at"]):
            time.sleep(max(0.0, self.t0 + item["at"] - time.time()))
            self.launch(item)
        time.sleep(max(0.0, self.t0 + self.seconds - time.time()))
        self.stopping.set()
        self.watch_stop.set()
        watcher.join(60)
        for thread in lanes:
            thread.join(120)
        self.healthy_host()

    def healthy_host(self) -> None:
        host = self.host
        host.fail_rate = host.reset_rate = host.delay = 0.0
        host.retry_after = None
        host.answer_for = None
        host._outage_until = 0.0

    def wait_for_apps(self) -> None:
        """Every app process ends by itself by its end time; later than grace is a hang."""
        while True:
            for _, proc, _ in self.top:
                proc.poll()
            reg = self.registry()
            killed = self.killed_pids(reg)
            running = [i for i in reg if alive(i["pid"], i["start"])]
            if not running:
                break
            now = time.time()
            for info in running:
                if now < info["end"] + self.hang_grace:
                    continue
                orphan = any(p in killed for p in info["lineage"])
                if info["role"] == "pool" and orphan:
                    # A Pool worker whose parent was SIGKILLed waits for tasks forever:
                    # that is multiprocessing's doing, not kmagent's.
                    self.note(f"orphaned pool worker {info['proc']} (pid {info['pid']}) killed")
                else:
                    stacks = dump_stacks(info["pid"])
                    self.fail(f"hang: app process {info['proc']} ({info['pattern']}, pid "
                              f"{info['pid']}) still running {now - info['end']:.0f} s past "
                              f"its end\n{stacks}")
                with self._lock:
                    self.killed.add((info["pid"], info["start"]))
                kill_hung(info["pid"])
            time.sleep(0.1)
        crashed = self.crashed_pids()
        for name, proc, log in self.top:
            try:
                code = proc.wait(10)
            except subprocess.TimeoutExpired:
                code = None
            if code == 3 and proc.pid in crashed:
                continue  # its crash is reported from its ledger
            if any(pid == proc.pid for pid, _ in self.killed):
                continue  # killed by a fault, or as hung (and reported so)
            if code not in (0, -signal.SIGKILL):
                self.fail(f"app process {name} exited with status {code}:\n{tail(log)}")
        # Processes the apps started themselves (the cli pattern's commands, signallers).
        time.sleep(0.2)

    def finish(self) -> None:
        self.wait_for_apps()
        for thread in self.op_threads:  # operators still running (each has a timeout)
            thread.join(120)
        reg = self.registry()
        killed = self.killed_pids(reg)
        crashed = self.crashed_pids()
        for info in reg:
            if info["done"] or self.was_killed(info) or info["pid"] in crashed:
                continue
            if any(p in killed for p in info["lineage"]):
                continue  # its parent was killed under it (a spawn/Pool child, say)
            log = self.workdir / "logs" / f"{info['proc'].split('.')[0]}.log"
            self.fail(f"app process {info['proc']} ({info['pattern']}, pid {info['pid']}) "
                      f"died without finishing, and nobody killed it:\n{tail(log)}")
        # Drain: dead letters back, then the daemon or a flush delivers everything.
        time.sleep(0.5)
        budget = time.time() + (30 if self.short else 90)
        quiet = "5" if self.short else "10"
        figures = None
        for attempt in range(3):
            self.kmagent(["dead", "retry", "--all"], 30, "final drain")
            if self.drain == "daemon":
                self.daemon.start()
                while time.time() < budget:
                    figures = self.status()
                    if figures is None or (figures["pending"] == 0 and figures["dead"] == 0):
                        break
                    if figures["dead"]:
                        self.kmagent(["dead", "retry", "--all"], 30, "final drain")
                    time.sleep(0.5)
            self.daemon.stop(signal.SIGTERM)
            code, out, err = self.kmagent(["flush", "--timeout", quiet], 120, "final flush")
            figures = self.status()
            if figures is None or (figures["pending"] == 0 and figures["dead"] == 0):
                break
            self.note(f"drain round {attempt + 1} left {figures['pending']} pending, "
                      f"{figures['dead']} dead (flush: {code} {err.strip()[-200:]})")
            if time.time() > budget:
                break
        self.final_status = figures
        if figures is not None:
            if figures["pending"] != 0:
                self.fail(f"status pending is {figures['pending']} after the final drain "
                          f"(in flight {figures['in_flight']}): {json.dumps(figures)}")
            if figures["dead"] != 0:
                self.fail(f"{figures['dead']} dead letters remain with a healthy host "
                          f"after dead retry --all and a flush")

    def cleanup(self) -> None:
        """Nothing may outlive the run: kill what is left (and say so)."""
        self.stopping.set()
        self.watch_stop.set()
        self.daemon.stop(signal.SIGTERM)
        for info in self.registry():
            if alive(info["pid"], info["start"]):
                self.fail(f"app process {info['proc']} (pid {info['pid']}) outlived the run")
                kill_hung(info["pid"])
        for _, proc, _ in self.top:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        marker = str(self.workdir)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                pid = int(entry.name)
                for _ in range(50):
                    if not alive(pid, None):
                        break
                    time.sleep(0.1)
                else:
                    self.fail(f"stray process {pid} outlived the run: {cmdline.replace(chr(0), ' ')}")
                    kill_hung(pid)

    # -- the oracle
    def crashed_pids(self) -> set[int]:
        return {int(path.stem) for path in (self.workdir / "ledger").glob("*.ledger")
                if b"\ncrash " in b"\n" + path.read_bytes()}

    def read_ledgers(self) -> dict[str, Any]:
        ok: dict[str, str] = {}
        raised: dict[str, tuple[str, str]] = {}
        unknown: set[str] = set()
        bad: list[tuple[str, str, str]] = []
        crashes: list[str] = []
        notes: collections.Counter = collections.Counter()
        for path in sorted((self.workdir / "ledger").glob("*.ledger")):
            data = path.read_bytes()
            for raw in data.split(b"\n")[:-1]:  # a torn last line (SIGKILL) is left out
                line = raw.decode(errors="replace")
                kind, _, rest = line.partition(" ")
                if kind == "ok":
                    ok[rest] = path.stem
                elif kind == "raised":
                    tid, exc_type, message = rest.split(" ", 2)
                    raised[tid] = (exc_type, json.loads(message))
                elif kind == "unknown":
                    unknown.add(rest.split(" ")[0])
                elif kind == "bad":
                    tid, exc_type, message = rest.split(" ", 2)
                    bad.append((tid, exc_type, json.loads(message)))
                elif kind == "crash":
                    crashes.append((int(path.stem), json.loads(rest.split(" ", 1)[1])))
                elif kind == "note":
                    what, message = rest.split(" ", 1)
                    notes[f"{what}: {json.loads(message)[:120]}"] += 1
        return {"ok": ok, "raised": raised, "unknown": unknown, "bad": bad,
                "crashes": crashes, "notes": notes}

    def pattern_of(self, tid: str) -> str:
        proc = tid.split("-")[1].split(".")[0]
        return self.patterns_by_proc.get(proc, "?")

    def judge(self) -> None:
        self.patterns_by_proc = {i["proc"]: i["pattern"] for i in self.schedule}
        ledgers = self.read_ledgers()
        ok, raised = ledgers["ok"], ledgers["raised"]
        targets: dict[str, set[str]] = collections.defaultdict(set)
        delivered: set[str] = set()
        statuses = collections.Counter()
        malformed = []
        who_wrong = []
        received = list(self.host.received)
        for request in received:
            statuses[request.status] += 1
            tid = tid_of(request.target)
            if tid is None or not TID_RE.match(tid):
                malformed.append(request.target)
                continue
            targets[tid].add(request.target)
            if request.status == 200:
                delivered.add(tid)
            values = dict(parse_qsl(urlsplit(request.target).query, keep_blank_values=True))
            if "who" in values and values.get("_p") != values["who"]:
                who_wrong.append(request.target)
        # 1. nothing acknowledged is lost
        lost = [t for t in ok if t not in delivered]
        if lost:
            by_pattern = collections.Counter(self.pattern_of(t) for t in lost)
            of_pattern = collections.Counter(self.pattern_of(t) for t in ok)
            never = sum(1 for t in lost if t not in targets)
            detail = ", ".join(f"{p}: {n} of {of_pattern[p]}" for p, n in by_pattern.most_common())
            self.fail(f"lost {len(lost)} of {len(ok)} events whose call returned ({never} never "
                      f"reached the host at all, the rest never with a 200) — by pattern: "
                      f"{detail}; e.g. {', '.join(sorted(lost)[:8])}")
        # 2. resends are byte-identical
        differing = {t: s for t, s in targets.items() if len(s) > 1}
        if differing:
            tid, seen = next(iter(sorted(differing.items())))
            self.fail(f"{len(differing)} events were sent with differing bytes, e.g. {tid} "
                      f"({self.pattern_of(tid)}):\n" + "\n".join(sorted(seen)[:4]))
        if malformed:
            self.fail(f"{len(malformed)} requests carry no well-formed id (a torn or mangled "
                      f"event?), e.g.:\n" + "\n".join(malformed[:4]))
        # 5. a call that raised is never delivered
        exempt = {t for t, (_, msg) in raised.items() if "may or may not" in msg}
        sent_raised = [t for t in raised if t not in exempt and t in targets]
        if sent_raised:
            examples = "; ".join(f"{t} ({self.pattern_of(t)}) raised {raised[t][0]}: "
                                 f"{raised[t][1][:200]}" for t in sent_raised[:4])
            self.fail(f"{len(sent_raised)} events whose call raised were delivered anyway: "
                      f"{examples}")
        for tid, exc_type, message in ledgers["bad"][:5]:
            where = self.pattern_of(tid) if tid != "-" else "?"
            self.fail(f"an app call raised {exc_type}, not a KmagentError ({where}, {tid}):\n"
                      f"{message[-2500:]}")
        if len(ledgers["bad"]) > 5:
            self.fail(f"... and {len(ledgers['bad']) - 5} more calls raised unexpected errors")
        procs = {i["pid"]: i for i in self.registry()}
        for pid, text in ledgers["crashes"][:3]:
            info = procs.get(pid, {})
            self.fail(f"app process {info.get('proc', '?')} ({info.get('pattern', '?')}, pid "
                      f"{pid}) crashed:\n{text[-2500:]}")
        if len(ledgers["crashes"]) > 3:
            self.fail(f"... and {len(ledgers['crashes']) - 3} more app processes crashed")
        # 6. KM's current person
        if who_wrong:
            self.fail(f"{len(who_wrong)} events carry another thread's or task's person, "
                      f"e.g.:\n" + "\n".join(who_wrong[:3]))
        # 3. the spool itself
        total_kills = sum(1 for i in self.registry() if self.was_killed(i))
        figures = getattr(self, "final_status", None) or {}
        if self.backend == "sqlite":
            if self.spool.exists():
                try:
                    conn = sqlite3.connect(self.spool)
                    try:
                        check = [r[0] for r in conn.execute("PRAGMA integrity_check")]
                    finally:
                        conn.close()
                except sqlite3.Error as exc:
                    check = [f"cannot open: {exc}"]
                if check != ["ok"]:
                    self.fail(f"PRAGMA integrity_check on {self.spool}: {'; '.join(check[:10])}")
        else:
            bad_lines = figures.get("bad_lines", 0) or 0
            if bad_lines > total_kills:
                bad_file = self.spool / "bad.jsonl"
                self.fail(f"{bad_lines} bad lines set aside in the jsonl spool, but only "
                          f"{total_kills} app processes were killed:\n{tail(bad_file, 5)[-2000:]}")
        # The summary
        raised_types = collections.Counter(e for e, _ in raised.values())
        resends = sum(1 for r in received if r.status == 200) - len(delivered)
        s = self.result.summary
        s.append(code_version())
        s.append(f"patterns: {', '.join(self.patterns)}")
        s.append(f"faults: {', '.join(self.faults) or 'none'}; fired: " + (", ".join(
            f"{n} x{c}" for n, c in self.fired.most_common()) or "none"))
        s.append(f"config: concurrency {self.concurrency}, durability {self.durability}, "
                 f"drain by {self.drain}; {len(self.top)} apps, {total_kills} app processes "
                 f"killed, {self.daemon.count} daemons")
        s.append(f"events: {len(ok)} returned, {len(raised)} raised "
                 f"({dict(raised_types) or 0}; {len(exempt)} 'may or may not'), "
                 f"{len(ledgers['unknown'])} interrupted; {len(delivered)} delivered, "
                 f"{resends} duplicate deliveries; host answers {dict(statuses)}")
        s.append("operators: " + (", ".join(f"{k} x{v}" for k, v in sorted(self.ops.items()))
                                  or "none"))
        if ledgers["notes"]:
            s.append("app notes: " + "; ".join(f"{k} x{v}" for k, v in ledgers["notes"].items()))
        if self.failures:
            s.append("timeline:\n      " + "\n      ".join(self.notes[-60:]))


def run(seed: int, seconds: float, backend: str, **options: Any) -> Result:
    """One run on one backend (see Run); returns its Result."""
    return Run(seed, seconds, backend, **options).execute()


# ----------------------------------------------------------------------------------
# Faults
# ----------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------


def names(text: str | None, known: dict[str, Any], what: str) -> list[str] | None:
    if text is None:
        return None
    if text == "none":
        return []
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--producer"]:
        return producer_main(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the chaos phase")
    parser.add_argument("--backend", choices=["sqlite", "jsonl", "both"], default="both")
    parser.add_argument("--patterns", help="comma-separated subset of the app patterns")
    parser.add_argument("--faults", help="comma-separated subset of the faults, or none")
    parser.add_argument("--short", action="store_true", help="the pytest mode's sizes")
    parser.add_argument("--workdir", type=Path, help="where to put spools, ledgers and logs")
    parser.add_argument("--keep", action="store_true", help="keep the workdir even on success")
    parser.add_argument("--list", action="store_true", help="list patterns and faults")
    parser.add_argument("-q", "--quiet", action="store_true", help="no timeline on stderr")
    args = parser.parse_args(argv)
    if args.list:
        for p in PATTERNS.values():
            print(f"pattern {p.name:20} {p.what}")
        for f in FAULTS.values():
            print(f"fault   {f.name:20} {f.lane} lane")
        return 0
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    patterns = names(args.patterns, PATTERNS, "patterns")
    faults = names(args.faults, FAULTS, "faults")
    backends = ["sqlite", "jsonl"] if args.backend == "both" else [args.backend]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"kmagent-torture-{seed}-"))
    print(f"kmagent torture: seed {seed}, {args.seconds:g} s, backends {', '.join(backends)}, "
          f"workdir {workdir}", flush=True)
    results = []
    for backend in backends:
        result = run(seed, args.seconds, backend, patterns=patterns, faults=faults,
                     workdir=workdir, short=args.short, verbose=not args.quiet)
        print(result.report(), flush=True)
        results.append(result)
    failed = [r for r in results if not r.ok]
    if not failed and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    for result in results:
        print(result.headline())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
