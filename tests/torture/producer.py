"""A producer process's entry point (``--producer SPEC``): one app pattern, run to its
end."""

from __future__ import annotations

import faulthandler
import json
import signal
import traceback
from pathlib import Path

from .app import App, AppOver, ChildExit
from .registry import PATTERNS


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
