"""The oracle: what the host received against what the apps' ledgers say, the
spool's own state, and the Result (verdict, summary, the command that reruns it)."""

from __future__ import annotations

import collections
import json
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .hangs import tail
from .registry import TID_RE


def code_version() -> str:
    """Which kmagent this run tests: the spool code changes under active work."""
    import hashlib

    import kmagent
    where = Path(kmagent.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(where.rglob("*.py")):
        digest.update(path.read_bytes())
    git = ["git", "-C", str(where.parent)]
    try:
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "kmagent"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        head, dirty = "", ""
    state = f"git {head}" + (" + uncommitted changes" if dirty else "") if head else "no git"
    return f"kmagent from {where} ({state}; sources sha256 {digest.hexdigest()[:12]})"


def tid_of(target: str) -> str | None:
    parts = urlsplit(target)
    params = parse_qsl(parts.query, keep_blank_values=True)
    values = dict(params)
    if "tid" in values:
        return values["tid"]
    name = values.get("_n", "")
    if parts.path.lstrip("/") == "a" and name.startswith("alias-"):
        return name[len("alias-"):]
    return None


@dataclass
class Result:
    seed: int
    backend: str
    seconds: float
    command: str
    failures: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    workdir: str = ""
    took: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def headline(self) -> str:
        verdict = "ok" if self.ok else f"FAILED ({len(self.failures)} failures)"
        return (f"torture seed {self.seed} backend {self.backend}: {verdict} in "
                f"{self.took:.1f} s; rerun: {self.command}")

    def report(self) -> str:
        lines = [self.headline()]
        lines += ["  " + line for line in self.summary]
        if self.failures:
            lines.append(f"  workdir (logs, ledgers, spool): {self.workdir}")
            for n, failure in enumerate(self.failures, 1):
                body = failure.replace("\n", "\n      ")
                lines.append(f"  FAILURE {n} [seed {self.seed} {self.backend}]: {body}")
        return "\n".join(lines)


class Oracle:
    """Run's verdict (a part of Run)."""

    def crashed_pids(self) -> set[int]:
        return {int(path.stem) for path in (self.workdir / "ledger").glob("*.ledger")
                if b"\ncrash " in b"\n" + path.read_bytes()}

    def read_ledgers(self) -> dict[str, Any]:
        ok: dict[str, str] = {}
        raised: dict[str, tuple[str, str]] = {}
        unknown: set[str] = set()
        bad: list[tuple[str, str, str]] = []
        crashes: list[str] = []
        notes: collections.Counter = collections.Counter()
        for path in sorted((self.workdir / "ledger").glob("*.ledger")):
            data = path.read_bytes()
            for raw in data.split(b"\n")[:-1]:  # a torn last line (SIGKILL) is left out
                line = raw.decode(errors="replace")
                kind, _, rest = line.partition(" ")
                if kind == "ok":
                    ok[rest] = path.stem
                elif kind == "raised":
                    tid, exc_type, message = rest.split(" ", 2)
                    raised[tid] = (exc_type, json.loads(message))
                elif kind == "unknown":
                    unknown.add(rest.split(" ")[0])
                elif kind == "bad":
                    tid, exc_type, message = rest.split(" ", 2)
                    bad.append((tid, exc_type, json.loads(message)))
                elif kind == "crash":
                    crashes.append((int(path.stem), json.loads(rest.split(" ", 1)[1])))
                elif kind == "note":
                    what, message = rest.split(" ", 1)
                    notes[f"{what}: {json.loads(message)[:120]}"] += 1
        return {"ok": ok, "raised": raised, "unknown": unknown, "bad": bad,
                "crashes": crashes, "notes": notes}

    def pattern_of(self, tid: str) -> str:
        proc = tid.split("-")[1].split(".")[0]
        return self.patterns_by_proc.get(proc, "?")

    def judge(self) -> None:
        self.patterns_by_proc = {i["proc"]: i["pattern"] for i in self.schedule}
        ledgers = self.read_ledgers()
        ok, raised = ledgers["ok"], ledgers["raised"]
        targets: dict[str, set[str]] = collections.defaultdict(set)
        delivered: set[str] = set()
        statuses = collections.Counter()
        malformed = []
        who_wrong = []
        received = list(self.host.received)
        for request in received:
            statuses[request.status] += 1
            tid = tid_of(request.target)
            if tid is None or not TID_RE.match(tid):
                malformed.append(request.target)
                continue
            targets[tid].add(request.target)
            if request.status == 200:
                delivered.add(tid)
            values = dict(parse_qsl(urlsplit(request.target).query, keep_blank_values=True))
            if "who" in values and values.get("_p") != values["who"]:
                who_wrong.append(request.target)
        # 1. nothing acknowledged is lost
        lost = [t for t in ok if t not in delivered]
        if lost:
            by_pattern = collections.Counter(self.pattern_of(t) for t in lost)
            of_pattern = collections.Counter(self.pattern_of(t) for t in ok)
            never = sum(1 for t in lost if t not in targets)
            detail = ", ".join(f"{p}: {n} of {of_pattern[p]}" for p, n in by_pattern.most_common())
            self.fail(f"lost {len(lost)} of {len(ok)} events whose call returned ({never} never "
                      f"reached the host at all, the rest never with a 200) — by pattern: "
                      f"{detail}; e.g. {', '.join(sorted(lost)[:8])}")
        # 2. resends are byte-identical
        differing = {t: s for t, s in targets.items() if len(s) > 1}
        if differing:
            tid, seen = next(iter(sorted(differing.items())))
            self.fail(f"{len(differing)} events were sent with differing bytes, e.g. {tid} "
                      f"({self.pattern_of(tid)}):\n" + "\n".join(sorted(seen)[:4]))
        if malformed:
            self.fail(f"{len(malformed)} requests carry no well-formed id (a torn or mangled "
                      f"event?), e.g.:\n" + "\n".join(malformed[:4]))
        # 5. a call that raised is never delivered
        exempt = {t for t, (_, msg) in raised.items() if "may or may not" in msg}
        sent_raised = [t for t in raised if t not in exempt and t in targets]
        if sent_raised:
            examples = "; ".join(f"{t} ({self.pattern_of(t)}) raised {raised[t][0]}: "
                                 f"{raised[t][1][:200]}" for t in sent_raised[:4])
            self.fail(f"{len(sent_raised)} events whose call raised were delivered anyway: "
                      f"{examples}")
        for tid, exc_type, message in ledgers["bad"][:5]:
            where = self.pattern_of(tid) if tid != "-" else "?"
            self.fail(f"an app call raised {exc_type}, not a KmagentError ({where}, {tid}):\n"
                      f"{message[-2500:]}")
        if len(ledgers["bad"]) > 5:
            self.fail(f"... and {len(ledgers['bad']) - 5} more calls raised unexpected errors")
        procs = {i["pid"]: i for i in self.registry()}
        for pid, text in ledgers["crashes"][:3]:
            info = procs.get(pid, {})
            self.fail(f"app process {info.get('proc', '?')} ({info.get('pattern', '?')}, pid "
                      f"{pid}) crashed:\n{text[-2500:]}")
        if len(ledgers["crashes"]) > 3:
            self.fail(f"... and {len(ledgers['crashes']) - 3} more app processes crashed")
        # 6. KM's current person
        if who_wrong:
            self.fail(f"{len(who_wrong)} events carry another thread's or task's person, "
                      f"e.g.:\n" + "\n".join(who_wrong[:3]))
        # 3. the spool itself
        total_kills = sum(1 for i in self.registry() if self.was_killed(i))
        figures = getattr(self, "final_status", None) or {}
        if self.backend == "sqlite":
            if self.spool.exists():
                try:
                    conn = sqlite3.connect(self.spool)
                    try:
                        check = [r[0] for r in conn.execute("PRAGMA integrity_check")]
                    finally:
                        conn.close()
                except sqlite3.Error as exc:
                    check = [f"cannot open: {exc}"]
                if check != ["ok"]:
                    self.fail(f"PRAGMA integrity_check on {self.spool}: {'; '.join(check[:10])}")
        else:
            bad_lines = figures.get("bad_lines", 0) or 0
            if bad_lines > total_kills:
                bad_file = self.spool / "bad.jsonl"
                self.fail(f"{bad_lines} bad lines set aside in the jsonl spool, but only "
                          f"{total_kills} app processes were killed:\n{tail(bad_file, 5)[-2000:]}")
        # The summary
        raised_types = collections.Counter(e for e, _ in raised.values())
        resends = sum(1 for r in received if r.status == 200) - len(delivered)
        s = self.result.summary
        s.append(code_version())
        s.append(f"patterns: {', '.join(self.patterns)}")
        s.append(f"faults: {', '.join(self.faults) or 'none'}; fired: " + (", ".join(
            f"{n} x{c}" for n, c in self.fired.most_common()) or "none"))
        s.append(f"config: concurrency {self.concurrency}, durability {self.durability}, "
                 f"drain by {self.drain}; {len(self.top)} apps, {total_kills} app processes "
                 f"killed, {self.daemon.count} daemons")
        s.append(f"events: {len(ok)} returned, {len(raised)} raised "
                 f"({dict(raised_types) or 0}; {len(exempt)} 'may or may not'), "
                 f"{len(ledgers['unknown'])} interrupted; {len(delivered)} delivered, "
                 f"{resends} duplicate deliveries; host answers {dict(statuses)}")
        s.append("operators: " + (", ".join(f"{k} x{v}" for k, v in sorted(self.ops.items()))
                                  or "none"))
        if ledgers["notes"]:
            s.append("app notes: " + "; ".join(f"{k} x{v}" for k, v in ledgers["notes"].items()))
        if self.failures:
            s.append("timeline:\n      " + "\n      ".join(self.notes[-60:]))
