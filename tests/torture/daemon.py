"""The `kmagent run` daemon of a run: started, signalled, stopped and checked."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .hangs import dump_stacks, kill_hung, tail
from .registry import TRACEBACK

if TYPE_CHECKING:
    from .run import Run


class Daemon:
    """The `kmagent run` process: started, killed and restarted by faults."""

    def __init__(self, run: "Run") -> None:
        self.run = run
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None
        self.count = 0
        self.lock = threading.RLock()
        self.expected_exit: dict[int, str] = {}

    def start(self) -> None:
        with self.lock:
            if self.proc is not None:
                return
            self.count += 1
            self.log = self.run.workdir / "logs" / f"daemon-{self.count}.log"
            with open(self.log, "w") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "kmagent", "run", "--config", str(self.run.config)],
                    stdout=out, stderr=subprocess.STDOUT, env=self.run.env, cwd=self.run.workdir)
            self.run.note(f"daemon {self.count} started (pid {self.proc.pid})")

    def stop(self, sig: int) -> None:
        """Signal the daemon and wait: SIGTERM must exit 0 within shutdown_timeout."""
        with self.lock:
            proc, log = self.proc, self.log
            if proc is None:
                return
            self.proc = None
            early = proc.poll()
            if early is not None:
                self.run.fail(f"daemon {self.count} (pid {proc.pid}) exited by itself with "
                              f"status {early}:\n{tail(log)}")
                self._check_log(log)
                return
            if sig != signal.SIGKILL and not self.wait_ready(proc, log):
                return
            proc.send_signal(sig)
            limit = 5 if sig == signal.SIGKILL else self.run.shutdown_timeout + 15
            try:
                code = proc.wait(limit)
            except subprocess.TimeoutExpired:
                stacks = dump_stacks(proc.pid)
                kill_hung(proc.pid)
                proc.wait(10)
                self.run.fail(f"hang: daemon {self.count} (pid {proc.pid}) did not exit "
                              f"within {limit} s of {signal.Signals(sig).name}\n{stacks}\n"
                              f"{tail(log)}")
                return
            if sig == signal.SIGTERM and code != 0:
                self.run.fail(f"daemon {self.count} exited {code} after SIGTERM "
                              f"(expected 0):\n{tail(log)}")
            self._check_log(log)

    def wait_ready(self, proc: subprocess.Popen, log: Path, limit: float = 30.0) -> bool:
        """Until the daemon has its handlers (it logs that it ships, or whom it waits
        for): a signal before that meets Python's defaults, which is no finding."""
        deadline = time.time() + limit
        while time.time() < deadline:
            text = log.read_text(errors="replace")
            if "shipping " in text or "being shipped by" in text:
                return True
            if proc.poll() is not None:
                self.run.fail(f"daemon {self.count} (pid {proc.pid}) exited by itself with "
                              f"status {proc.returncode} while starting:\n{tail(log)}")
                return False
            time.sleep(0.05)
        stacks = dump_stacks(proc.pid)
        kill_hung(proc.pid)
        proc.wait(10)
        self.run.fail(f"hang: daemon {self.count} (pid {proc.pid}) not shipping (nor waiting "
                      f"for the lock) {limit:g} s after it started\n{stacks}\n{tail(log)}")
        return False

    def signal(self, sig: int) -> None:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                return
            if self.wait_ready(self.proc, self.log):
                self.proc.send_signal(sig)
            else:
                self.proc = None

    def _check_log(self, log: Path | None) -> None:
        text = log.read_text(errors="replace") if log else ""
        if TRACEBACK in text or "Fatal Python error" in text:
            self.run.fail(f"daemon log {log.name} shows a traceback:\n{text[-4000:]}")
