"""The app processes of a run, seen from the engine: launched, registered, killed by
faults, watched for stalls, waited for at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from .hangs import alive, dump_stacks, kill_hung, tail
from .registry import HERE


class AppProcesses:
    """Run's app processes (a part of Run)."""

    # -- producers
    def launch(self, item: dict[str, Any]) -> None:
        spec = {"seed": self.seed, "config": str(self.config), "workdir": str(self.workdir),
                "proc": item["proc"], "pattern": item["pattern"], "rate": item["rate"],
                "end": time.time() + item["duration"], "lineage": []}
        path = self.workdir / "specs" / f"{item['proc']}.json"
        path.write_text(json.dumps(spec))
        log = self.workdir / "logs" / f"{item['proc']}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, str(HERE), "--producer", str(path)],
                                    stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=self.workdir)
        self.top.append((item["proc"], proc, log))
        self.note(f"{item['proc']} {item['pattern']} started (pid {proc.pid}, "
                  f"{item['duration']:.1f} s, {item['rate']}/s)")

    def registry(self) -> list[dict[str, Any]]:
        out = []
        procs = self.workdir / "procs"
        for path in procs.glob("*.json"):
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            pid = info["pid"]
            info["done"] = (procs / f"{pid}.done").exists()
            info["selfkill"] = (procs / f"{pid}.selfkill").exists()
            out.append(info)
        return out

    def was_killed(self, info: dict[str, Any]) -> bool:
        return info["selfkill"] or (info["pid"], info["start"]) in self.killed

    def killed_pids(self, reg: list[dict[str, Any]]) -> set[int]:
        return {i["pid"] for i in reg if self.was_killed(i)}

    def live_apps(self) -> list[dict[str, Any]]:
        """Victims for kill_producer: every app process but Pool workers (a Pool never
        finishes a task whose worker died: multiprocessing's limit, not kmagent's)."""
        return [i for i in self.registry()
                if not i["done"] and i["role"] != "pool" and i["end"] > time.time() + 0.3
                and alive(i["pid"], i["start"])]

    def silent_for(self, info: dict[str, Any]) -> float:
        """Seconds since the app process last wrote its ledger (or registered)."""
        last = 0.0
        for path in (self.workdir / "ledger" / f"{info['pid']}.ledger",
                     self.workdir / "procs" / f"{info['pid']}.json"):
            try:
                last = max(last, path.stat().st_mtime)
            except OSError:
                pass
        return time.time() - last

    def kill(self, info: dict[str, Any]) -> None:
        silent = self.silent_for(info)
        if info["role"] not in ("pool", "master") and silent > 8 + self.stall_limit - 15:
            # Hung already: say so before the kill hides it.
            self.stalled.add(info["pid"])
            self.fail(f"hang: app process {info['proc']} ({info['pattern']}, pid "
                      f"{info['pid']}) had recorded nothing for {silent:.0f} s when a fault "
                      f"came to kill it\n{dump_stacks(info['pid'])}")
        with self._lock:
            self.killed.add((info["pid"], info["start"]))
        try:
            os.kill(info["pid"], signal.SIGKILL)
        except ProcessLookupError:
            return
        self.kills[info["pattern"]] += 1
        self.note(f"SIGKILL {info['proc']} ({info['pattern']}, pid {info['pid']})")

    def watch_stalls(self) -> None:
        """An app process whose ledger stops growing before its end is hung (a hang
        may hold a lock that stalls everyone else): report it with its stacks, then
        kill it, so that the rest of the run still means something."""
        seen: dict[int, tuple[int, float]] = {}
        while not self.watch_stop.wait(1.0):
            now = time.time()
            for info in self.registry():
                pid = info["pid"]
                if (info["role"] in ("pool", "master") or info["done"] or now > info["end"]
                        or (pid, info["start"]) in self.killed or pid in self.stalled
                        or not alive(pid, info["start"])):
                    continue
                try:
                    size = (self.workdir / "ledger" / f"{pid}.ledger").stat().st_size
                except OSError:
                    size = -1
                before = seen.get(pid)
                if before is None or before[0] != size:
                    seen[pid] = (size, now)
                    continue
                if now - before[1] < self.stall_limit:
                    continue
                self.stalled.add(pid)
                stacks = dump_stacks(pid)
                self.fail(f"hang: app process {info['proc']} ({info['pattern']}, pid {pid}) "
                          f"recorded nothing for {now - before[1]:.0f} s before its end "
                          f"(killed now)\n{stacks}")
                with self._lock:
                    self.killed.add((pid, info["start"]))
                kill_hung(pid)


    def wait_for_apps(self) -> None:
        """Every app process ends by itself by its end time; later than grace is a hang."""
        while True:
            for _, proc, _ in self.top:
                proc.poll()
            reg = self.registry()
            killed = self.killed_pids(reg)
            running = [i for i in reg if alive(i["pid"], i["start"])]
            if not running:
                break
            now = time.time()
            for info in running:
                if now < info["end"] + self.hang_grace:
                    continue
                orphan = any(p in killed for p in info["lineage"])
                if info["role"] == "pool" and orphan:
                    # A Pool worker whose parent was SIGKILLed waits for tasks forever:
                    # that is multiprocessing's doing, not kmagent's.
                    self.note(f"orphaned pool worker {info['proc']} (pid {info['pid']}) killed")
                else:
                    stacks = dump_stacks(info["pid"])
                    self.fail(f"hang: app process {info['proc']} ({info['pattern']}, pid "
                              f"{info['pid']}) still running {now - info['end']:.0f} s past "
                              f"its end\n{stacks}")
                with self._lock:
                    self.killed.add((info["pid"], info["start"]))
                kill_hung(info["pid"])
            time.sleep(0.1)
        crashed = self.crashed_pids()
        for name, proc, log in self.top:
            try:
                code = proc.wait(10)
            except subprocess.TimeoutExpired:
                code = None
            if code == 3 and proc.pid in crashed:
                continue  # its crash is reported from its ledger
            if any(pid == proc.pid for pid, _ in self.killed):
                continue  # killed by a fault, or as hung (and reported so)
            if code not in (0, -signal.SIGKILL):
                self.fail(f"app process {name} exited with status {code}:\n{tail(log)}")
        # Processes the apps started themselves (the cli pattern's commands, signallers).
        time.sleep(0.2)
