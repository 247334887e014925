"""``python tests/torture ...`` (Python runs a directory by its __main__.py; the app
processes are started so too, with ``--producer SPEC``), or ``python -m torture`` from
tests/."""

import sys
from pathlib import Path

if __package__:
    from .cli import main
else:
    # A directory run puts this directory first on sys.path: put its parent there
    # instead, so that the package imports as ``torture`` (as pytest imports it, and as
    # a spawn or forkserver child finds what multiprocessing pickled by name) and its
    # modules never pass for top-level ones.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))
    from torture.cli import main

sys.exit(main())
