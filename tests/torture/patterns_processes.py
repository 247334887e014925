"""App patterns across processes and signals: os.fork, a gunicorn-like preloading
master, multiprocessing with each start method, signal handlers that record or raise.

mp_worker and mp_task are what multiprocessing pickles by name (this module's): a
spawn or forkserver child imports them from here."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from .app import App, AppOver, ClientAPI, Interrupted, fork_child, new_client, reap, run_threads
from .registry import pattern


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


def recorded_before(app: App, least: int, most: int) -> ClientAPI:
    """A new Client that has recorded ``least`` to ``most`` events (before a fork)."""
    api = ClientAPI(new_client(app))
    for _ in range(app.rng.randint(least, most)):
        app.emit(api, app.rng)
    return api


@pattern("fork_parent_exits", "fork; the parent exits at once, the child goes on")
def pat_fork_parent_exits(app: App) -> None:
    rng = app.rng
    api = recorded_before(app, 1, 30)

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
    api = recorded_before(app, 0, 20)

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
