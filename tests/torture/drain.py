"""The end of a run: apps done, the spool drained (by the daemon or a flush) with a
healthy host, and nothing left running."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from .hangs import alive, kill_hung, tail


class Ending:
    """Run's drain and cleanup (a part of Run)."""

    def finish(self) -> None:
        self.wait_for_apps()
        for thread in self.op_threads:  # operators still running (each has a timeout)
            thread.join(120)
        reg = self.registry()
        killed = self.killed_pids(reg)
        crashed = self.crashed_pids()
        for info in reg:
            if info["done"] or self.was_killed(info) or info["pid"] in crashed:
                continue
            if any(p in killed for p in info["lineage"]):
                continue  # its parent was killed under it (a spawn/Pool child, say)
            log = self.workdir / "logs" / f"{info['proc'].split('.')[0]}.log"
            self.fail(f"app process {info['proc']} ({info['pattern']}, pid {info['pid']}) "
                      f"died without finishing, and nobody killed it:\n{tail(log)}")
        # Drain: dead letters back, then the daemon or a flush delivers everything.
        time.sleep(0.5)
        budget = time.time() + (30 if self.short else 90)
        quiet = "5" if self.short else "10"
        figures = None
        for attempt in range(3):
            self.kmagent(["dead", "retry", "--all"], 30, "final drain")
            if self.drain == "daemon":
                self.daemon.start()
                while time.time() < budget:
                    figures = self.status()
                    if figures is None or (figures["pending"] == 0 and figures["dead"] == 0):
                        break
                    if figures["dead"]:
                        self.kmagent(["dead", "retry", "--all"], 30, "final drain")
                    time.sleep(0.5)
            self.daemon.stop(signal.SIGTERM)
            code, out, err = self.kmagent(["flush", "--timeout", quiet], 120, "final flush")
            figures = self.status()
            if figures is None or (figures["pending"] == 0 and figures["dead"] == 0):
                break
            self.note(f"drain round {attempt + 1} left {figures['pending']} pending, "
                      f"{figures['dead']} dead (flush: {code} {err.strip()[-200:]})")
            if time.time() > budget:
                break
        self.final_status = figures
        if figures is not None:
            if figures["pending"] != 0:
                self.fail(f"status pending is {figures['pending']} after the final drain "
                          f"(in flight {figures['in_flight']}): {json.dumps(figures)}")
            if figures["dead"] != 0:
                self.fail(f"{figures['dead']} dead letters remain with a healthy host "
                          f"after dead retry --all and a flush")

    def cleanup(self) -> None:
        """Nothing may outlive the run: kill what is left (and say so)."""
        self.stopping.set()
        self.watch_stop.set()
        self.daemon.stop(signal.SIGTERM)
        for info in self.registry():
            if alive(info["pid"], info["start"]):
                self.fail(f"app process {info['proc']} (pid {info['pid']}) outlived the run")
                kill_hung(info["pid"])
        for _, proc, _ in self.top:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        marker = str(self.workdir)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                pid = int(entry.name)
                for _ in range(50):
                    if not alive(pid, None):
                        break
                    time.sleep(0.1)
                else:
                    self.fail(f"stray process {pid} outlived the run: {cmdline.replace(chr(0), ' ')}")
                    kill_hung(pid)
