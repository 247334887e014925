"""The engine's look at a process: alive (and the same one), its stacks when hung,
the kill that follows, the tail of its log."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


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
