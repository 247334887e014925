"""The app pattern that is the `kmagent record/set/alias` command line."""

from __future__ import annotations

import json
import subprocess
import sys

from .app import App
from .registry import EVENT_NAMES, TRACEBACK, pattern


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
