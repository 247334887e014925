"""One torture run on one backend: Run puts the plan, the daemon, the app processes,
the fault lanes and the operators together, then the drain and the oracle."""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

from .daemon import Daemon
from .drain import Ending
from .hangs import dump_stacks, kill_hung
from .oracle import Oracle, Result
from .plan import Planning
from .registry import FAULTS, TRACEBACK
from .watch import AppProcesses


class Run(Planning, AppProcesses, Ending, Oracle):
    """One torture run on one backend."""

    def __init__(self, seed: int, seconds: float, backend: str, *,
                 patterns: list[str] | None = None, faults: list[str] | None = None,
                 workdir: Path | None = None, short: bool = False, verbose: bool = False,
                 command: str | None = None) -> None:
        self.seed = seed
        self.seconds = seconds
        self.backend = backend
        self.short = short
        self.verbose = verbose
        self.rng = random.Random(f"torture/{seed}/{backend}")
        self.explicit_patterns = patterns
        self.explicit_faults = faults
        self.command = command or self.rerun_command()
        base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kmagent-torture-"))
        self.workdir = base / backend
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        for sub in ("ledger", "procs", "logs", "specs", "state"):
            (self.workdir / sub).mkdir(parents=True)
        self.result = Result(seed, backend, seconds, self.command, workdir=str(self.workdir))
        self.failures = self.result.failures
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self.killed: set[tuple[int, str | None]] = set()
        self.kills = collections.Counter()
        self.fired: collections.Counter = collections.Counter()
        self.top: list[tuple[str, subprocess.Popen, Path]] = []
        self.ops = collections.Counter()
        self.op_threads: list[threading.Thread] = []
        self.t0 = time.time()
        self.stopping = threading.Event()
        # A hang never ends; how long to wait before calling it one only costs time. The
        # machine may be shared: a busy one gets longer.
        busy = max(0.0, os.getloadavg()[0] - (os.cpu_count() or 1))
        self.hang_grace = (12.0 if short else 20.0) + min(30.0, 2 * busy)
        self.stall_limit = 15.0 + min(30.0, 2 * busy)
        self.stalled: set[int] = set()
        self.watch_stop = threading.Event()
        self.shutdown_timeout = 3.0

    def rerun_command(self) -> str:
        cmd = (f"python tests/torture --seed {self.seed} --backend {self.backend} "
               f"--seconds {self.seconds:g}")
        if self.explicit_patterns is not None:
            cmd += f" --patterns {','.join(self.explicit_patterns)}"
        if self.explicit_faults is not None:
            cmd += f" --faults {','.join(self.explicit_faults) or 'none'}"
        if self.short:
            cmd += " --short"
        return cmd

    # -- bookkeeping
    def fail(self, text: str) -> None:
        with self._lock:
            self.failures.append(text)
        if self.verbose:
            print(f"[{time.time() - self.t0:6.1f}] FAILURE: {text.splitlines()[0]}",
                  file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        with self._lock:
            self.notes.append(f"{time.time() - self.t0:6.1f} {text}")
        if self.verbose:
            print(f"[{time.time() - self.t0:6.1f}] {text}", file=sys.stderr, flush=True)

    # -- lanes
    def lane(self, events: list[tuple[float, str]], seed_label: str) -> None:
        rng = random.Random(f"{self.seed}/{self.backend}/{seed_label}")
        for at, name in events:
            if self.stopping.wait(max(0.0, self.t0 + at - time.time())):
                return
            self.note(f"fault {name}")
            with self._lock:
                self.fired[name] += 1
            try:
                FAULTS[name].fn(self, rng)
            except Exception:
                self.fail(f"the torture engine's fault {name} crashed:\n{traceback.format_exc()}")

    def operators(self) -> None:
        for n, (at, args) in enumerate(self.operator_plan):
            if self.stopping.wait(max(0.0, self.t0 + at - time.time())):
                return
            args = [a.format(workdir=self.workdir) for a in args]
            # Operators do not wait for each other: a flush may take a while.
            thread = threading.Thread(target=self.operator, args=(args,), daemon=True)
            thread.start()
            self.op_threads.append(thread)

    def kmagent(self, args: list[str], timeout: float, what: str = "operator") -> tuple[int | None, str, str]:
        """Run a kmagent command; a traceback or a hang is a failure."""
        cmd = [sys.executable, "-m", "kmagent", *args, "--config", str(self.config)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, cwd=self.workdir)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stacks = dump_stacks(proc.pid)
            kill_hung(proc.pid)
            out, err = proc.communicate(timeout=10)
            self.fail(f"hang: {what} `kmagent {' '.join(args)}` still running after "
                      f"{timeout:g} s\n{stacks}\n{err[-3000:]}")
            return None, out, err
        if TRACEBACK in err or "Fatal Python error" in err:
            self.fail(f"{what} `kmagent {' '.join(args)}` exited {proc.returncode} with a "
                      f"traceback:\n{err[-4000:]}")
        return proc.returncode, out, err

    def operator(self, args: list[str]) -> None:
        timeout = 60.0 if args[0] == "flush" else 30.0
        code, out, err = self.kmagent(args, timeout)
        name = " ".join(a for a in args if not a.startswith(str(self.workdir)))
        with self._lock:
            self.ops[f"{name} -> {code}"] += 1
        if code == 0 and "--json" in args:
            try:
                json.loads(out)
            except ValueError:
                self.fail(f"operator `kmagent {name}` printed output that is not JSON: {out[:500]!r}")
        if code not in (0, None) and not (args[0] == "flush" and code == 1) and not (
                args[0] == "export" and code == 2):
            self.note(f"operator `kmagent {name}` exited {code}: {err.strip()[-300:]}")

    def status(self) -> dict[str, Any] | None:
        code, out, err = self.kmagent(["status", "--json"], 30, "final check")
        if code != 0:
            self.fail(f"`kmagent status --json` exited {code}: {err[-2000:]}")
            return None
        return json.loads(out)

    # -- the run
    def execute(self) -> Result:
        from kmagent.testhost import StandInHost
        started = time.monotonic()
        self.plan()
        self.host = StandInHost(seed=zlib.crc32(f"{self.seed}/{self.backend}".encode()))
        with self.host:
            self.disk = self.mount_disk()
            self.write_config()
            self.daemon = Daemon(self)
            self.t0 = time.time()
            try:
                self.chaos()
                self.finish()
            finally:
                self.cleanup()
            try:
                self.judge()
            finally:
                if self.disk is not None:
                    subprocess.run(["umount", "-l", str(self.disk)], capture_output=True)
        self.result.took = time.monotonic() - started
        return self.result

    def chaos(self) -> None:
        if self.rng.random() < 0.8:
            self.daemon.start()  # else: the first fault of the process lane starts one
        lanes = [threading.Thread(target=self.lane, args=(events, lane), daemon=True)
                 for lane, events in self.lanes.items()]
        lanes.append(threading.Thread(target=self.operators, daemon=True))
        watcher = threading.Thread(target=self.watch_stalls, daemon=True)
        watcher.start()
        for thread in lanes:
            thread.start()
        for item in sorted(self.schedule, key=lambda i: i["at"]):
            time.sleep(max(0.0, self.t0 + item["at"] - time.time()))
            self.launch(item)
        time.sleep(max(0.0, self.t0 + self.seconds - time.time()))
        self.stopping.set()
        self.watch_stop.set()
        watcher.join(60)
        for thread in lanes:
            thread.join(120)
        self.healthy_host()

    def healthy_host(self) -> None:
        host = self.host
        host.fail_rate = host.reset_rate = host.delay = 0.0
        host.retry_after = None
        host.answer_for = None
        host._outage_until = 0.0

def run(seed: int, seconds: float, backend: str, **options: Any) -> Result:
    """One run on one backend (see Run); returns its Result."""
    return Run(seed, seconds, backend, **options).execute()
