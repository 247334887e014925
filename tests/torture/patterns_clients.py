"""App patterns in one process, through the library's front doors: Client, KM,
kmagent.status(), the compat module, asyncio tasks."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import traceback

from .app import KMAPI, App, ClientAPI, CompatKMAPI, construct, new_client, run_threads
from .registry import API_KEY, COMPAT_KEYS, pattern


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
