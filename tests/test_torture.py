"""The torture suite's short mode (tests/torture/): a few app patterns, every fault,
the whole oracle, on each backend: about 12 s each (up to ~25 s when something hangs).

The seed comes from KMAGENT_TORTURE_SEED, else it is drawn at random; it is in the
test's id and at the head of every failure, with the command that reruns it. For a
longer run: ``make torture SEED=123 SECONDS=120``.
"""

from __future__ import annotations

import os
import random

import pytest

import torture

SEED = int(os.environ.get("KMAGENT_TORTURE_SEED") or random.SystemRandom().randrange(1, 10**6))
SECONDS = 9.0  # the chaos phase; then the wait for the apps, the drain and the oracle


@pytest.mark.parametrize("backend", ["sqlite", "jsonl"], ids=lambda b: f"{b}-seed{SEED}")
def test_torture_short(backend, tmp_path):
    print(f"kmagent torture: seed {SEED} (KMAGENT_TORTURE_SEED={SEED} reruns this test); "
          f"python tests/torture --seed {SEED} --backend {backend} --seconds {SECONDS:g} --short")
    result = torture.run(SEED, SECONDS, backend, workdir=tmp_path, short=True)
    print(result.report())
    assert result.ok, result.report()
