"""The registries (app patterns, faults, operators) and the constants the suite shares:
where it lives, the API key, the event names, what an id looks like."""

from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .app import App
    from .run import Run

# HERE is what runs the suite (``python HERE ...``, producers ``--producer SPEC``): this
# package's directory, which has a __main__.py.
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

API_KEY = "torture-key"
COMPAT_KEYS = (API_KEY, API_KEY, "torture-compat-key")
EVENT_NAMES = ("Signed Up", "Viewed Homepage", "Checkout & Pay", "Viewed Página",
               "billing/renew", "Clicked ☃")
TID_RE = re.compile(r"^\d+-[A-Za-z0-9_.]+-\d+-\d+$")
TRACEBACK = "Traceback (most recent call last)"

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

