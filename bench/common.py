"""What the benchmarks share: the loopback host, medians, markdown tables, the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

BENCH = Path(__file__).resolve().parent
# Figures the sections measured, by name, for the headline table (bench/run.py).
FIGURES: dict[str, float] = {}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def loop_host(delay: float = 0.0, log: Path | None = None) -> Iterator[str]:
    """bench/loophost.py in its own process (an asyncio host: cheap, so the client is
    what is measured; in this process it would compete for the GIL); yields its URL."""
    port = free_port()
    command = [sys.executable, str(BENCH / "loophost.py"), "--port", str(port),
               "--delay", str(delay)] + (["--log", str(log)] if log else [])
    host = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        host.stderr.readline()  # "listening"
        yield f"http://127.0.0.1:{port}"
    finally:
        host.terminate()
        host.wait()


def median_of(fn: Callable[..., float], *args: Any, rounds: int = 5) -> float:
    return statistics.median(fn(*args) for _ in range(rounds))


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A markdown table; ``align`` gives l/r per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [headers, rule] + [[str(cell) for cell in row] for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.1f} GiB RAM"
    return (f"{cpu}, {os.cpu_count()} cores{memory}; Linux {platform.release()}; "
            f"Python {platform.python_version()}; SQLite {sqlite3.sqlite_version}")
