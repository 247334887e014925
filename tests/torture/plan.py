"""A run's plan, drawn from its seed (configuration, apps, fault lanes, operators),
and the spool's filesystem and config file it runs with."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from .faults import DISK_MIB
from .km_logs import KM_LOG_DIRS, km_log_dir
from .registry import API_KEY, FAULTS, MACHINE_NETWORK_ENV, OPERATOR_COMMANDS, PATTERNS, ROOT


class Planning:
    """Run's plan and setup (a part of Run)."""

    # -- plan
    def plan(self) -> None:
        rng = self.rng
        self.concurrency = rng.choice([4, 8, 8, 16, "auto"])
        self.durability = rng.choice(["normal"] * 5 + ["full"])
        self.drain = rng.choice(["daemon", "flush"])
        if self.explicit_patterns is not None:
            chosen = list(self.explicit_patterns)
        else:
            names = sorted(PATTERNS)
            weights = [PATTERNS[n].weight for n in names]
            k = rng.randint(3, 5) if self.short else rng.randint(4, 8)
            chosen = []
            while len(chosen) < min(k, len(names)):
                pick = rng.choices(names, weights)[0]
                if pick not in chosen:
                    chosen.append(pick)
        self.patterns = chosen
        if self.explicit_faults is not None:
            self.faults = list(self.explicit_faults)
        else:
            self.faults = sorted(FAULTS)
        # Producers: a few slots, each a sequence of apps back to back; every chosen
        # pattern gets at least one app.
        chaos = self.seconds
        slots = 3 if self.short else 4
        order = list(chosen)
        rng.shuffle(order)
        self.schedule: list[dict[str, Any]] = []
        n = 0
        for slot in range(slots):
            at = rng.uniform(0, min(1.0, chaos * 0.1))
            while at < chaos - 1.5:
                duration = min(chaos - at, rng.uniform(2.0, max(2.5, chaos / 2.5)))
                name = order[n % len(order)] if n < len(order) else rng.choice(chosen)
                self.schedule.append({"proc": f"p{n}", "pattern": name, "at": at,
                                      "duration": duration,
                                      "rate": round(rng.uniform(20, 80), 1)})
                n += 1
                at += duration + rng.uniform(0, 1.0)
        # Faults: two lanes; operators: a third.
        self.lanes: dict[str, list[tuple[float, str]]] = {}
        for lane in ("process", "host", "disk"):
            names = [f for f in self.faults if FAULTS[f].lane == lane]
            events, at = [], rng.uniform(0.3, 1.5)
            while names and at < chaos - 0.5:
                events.append((at, rng.choices(names, [FAULTS[f].weight for f in names])[0]))
                at += rng.uniform(0.5, 2.0)
            self.lanes[lane] = events
        ops, at = [], rng.uniform(0.2, 1.0)
        while at < chaos - 0.5:
            ops.append((at, rng.choices([c for _, c in OPERATOR_COMMANDS],
                                        [w for w, _ in OPERATOR_COMMANDS])[0]))
            at += rng.uniform(0.4, 2.0)
        self.operator_plan = ops

    def mount_disk(self) -> Path | None:
        """A filesystem of the spool's own for the disk lane (a tmpfs, so root only);
        without one the disk faults are left out."""
        if not any(FAULTS[f].lane == "disk" for f in self.faults):
            return None
        disk = self.workdir / "disk"
        disk.mkdir()
        if os.geteuid() != 0 or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m", "tmpfs", str(disk)],
                capture_output=True).returncode != 0:
            self.note("no tmpfs for the spool (not root?): disk faults left out")
            self.faults = [f for f in self.faults if FAULTS[f].lane != "disk"]
            self.lanes["disk"] = []
            return None
        return disk

    def write_config(self) -> None:
        home = self.disk if self.disk is not None else self.workdir
        self.spool = home / ("spool.db" if self.backend == "sqlite" else "spool.jsonl.d")
        concurrency = (f'"{self.concurrency}"' if isinstance(self.concurrency, str)
                       else self.concurrency)
        text = "\n".join([
            f'api_key = "{API_KEY}"',
            f'endpoint = "{self.host.url}"',
            "[spool]",
            f'backend = "{self.backend}"',
            f'path = "{self.spool}"',
            f'durability = "{self.durability}"',
            "rotate_bytes = 65536",
            "[ship]",
            f"concurrency = {concurrency}",
            "max_concurrency = 16",
            "max_backoff = 1",
            f"shutdown_timeout = {self.shutdown_timeout:g}",
            "connect_timeout = 2",
            "read_timeout = 3",
            "[km_log]",
            "dirs = [" + ", ".join(f'"{km_log_dir(self.workdir, style)}"'
                                   for style in KM_LOG_DIRS) + "]",
            "[log]",
            'level = "info"',
        ]) + "\n"
        for style in KM_LOG_DIRS:
            km_log_dir(self.workdir, style).mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "config.toml"
        self.config.write_text(text)
        self.config.chmod(0o600)
        env = os.environ.copy()
        for name in MACHINE_NETWORK_ENV:
            env.pop(name, None)
        env["KMAGENT_CONFIG"] = str(self.config)
        env["XDG_STATE_HOME"] = str(self.workdir / "state")
        env["PYTHONFAULTHANDLER"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + (
            [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.env = env
