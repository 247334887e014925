"""The command line: ``python tests/torture --seed N --seconds S ...`` (see the
package's docstring), and ``--producer SPEC`` for an app process."""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import __doc__ as MANUAL
from .producer import producer_main
from .registry import FAULTS, PATTERNS
from .run import run


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
    parser = argparse.ArgumentParser(description=MANUAL.split("\n\n")[0])
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
