"""kmagent's torture suite: real app processes, real daemons, real faults, one seed.

    python tests/torture --seed N --seconds S --backend sqlite|jsonl|both
                        [--patterns a,b] [--faults x,y|none] [--short] [--keep] [--list]

S is the length of the chaos phase (apps, faults, operators); the drain and the oracle
follow. --short is the pytest mode's shape (fewer patterns, shorter hang waits).

One integer seed decides everything random: the configuration (concurrency,
durability, how the run drains), which app patterns run, when and how fast, which
faults strike and when, and what the operators type. Apps are separate Python
processes (this package, run with ``--producer SPEC``); each keeps a LEDGER, one line per
call: ``ok TID`` written only after record()/set()/alias() returned, ``raised TID TYPE
MESSAGE`` when it raised. Every call carries its own id (``tid`` property, or the alias
identity ``alias-TID``), so every attempt is told apart at the stand-in host.

App patterns (PATTERNS; ``--patterns`` runs a subset, each can run alone):
  plain               one Client, one thread (the baseline)
  threads             one Client shared by 2-4 threads
  two_clients         2-3 Clients in one process, used alternately, now and then replaced
  km_reinit           kmagent.KM, KM.init() called again after use, a second KM thread
  status_in_app       kmagent.status() between records (a health endpoint)
  compat_per_request  kmagent.compat.kissmetrics KM(key) / Client(key) made per request
  asyncio_tasks       asyncio tasks, each with its own KM identity, some calls in threads
  web_wsgi, web_asgi  kmagent.web's middleware around an app: a one-thread WSGI server, or
                      concurrent ASGI requests with sync work in a pool; requests that log
                      in, are named by the identify hook, are anonymous, stream, raise.
                      An anonymous request's record() must refuse (else LeakedPerson)
  fork_inherited      os.fork(); parent and child go on with the INHERITED Client
  fork_new_client     os.fork(); the child makes a NEW Client
  fork_parent_exits   os.fork(); the parent exits at once, the child goes on
  gunicorn_preload    master makes a Client, forks workers that record, master SIGKILLs itself
  mp_fork, mp_forkserver, mp_spawn
                      multiprocessing Process or Pool workers with that start method
  signal_handler      record() from SIGALRM (setitimer) and SIGUSR1 (another process)
                      handlers while the main thread records: must return or raise, not hang
  signal_raises       a SIGALRM handler raises (like KeyboardInterrupt) into the main
                      thread's record() while other threads record
  cli_commands        `kmagent record/set/alias` commands, ledgered on exit 0
  km_log_km, km_log_kmts, km_log_kmphp, km_log_kissmetrics_php
                      a writer of Kissmetrics' own query log in one of the daemon's
                      [km_log] dirs, as that library writes it (kmts under an flock,
                      the others with none; kissmetrics-php as serialize()d arrays)

Faults (FAULTS, in two lanes that overlap; ``--faults`` picks, ``none`` for none):
  process lane: kill_producer (SIGKILL a live app process), kill_daemon (SIGKILL and
                restart), term_daemon (SIGTERM, must exit 0, restart), sighup_daemon,
                stop_producer / stop_daemon (SIGSTOP for a while, then SIGCONT)
  host lane:    host_flaky (fail_rate/reset_rate), host_outage (503s or resets),
                host_slow, host_refuses (400 for some events: dead letters),
                host_retry_after
  disk lane:    disk_full (another program takes every byte of the spool's own 48 MiB
                tmpfs for a while), damage_checkpoint (jsonl: garbage in checkpoint.json);
                root only (a tmpfs), else left out
Operators, at random times: status [--json], flush --timeout 2, dead list [--json],
dead retry --all, export [--dead], reload. Exit codes may be nonzero; a traceback on stderr
or a hang is a failure.

The oracle, once producers are done, faults over, the host healthy and the spool
drained (by the daemon, or by `kmagent flush`, as the seed says):
  1. every ledgered ``ok`` id reached the host with a 200 answer;
  2. every resend is byte-identical: all request targets of one id are one string;
  3. SQLite: PRAGMA integrity_check is ok (every kmagent process has exited); jsonl: no
     more bad lines than app processes were killed; both: status pending == 0, dead 0;
  4. nothing hangs: apps, operators and daemons end within their timeouts, and an app
     never stops recording before its end for long (a hung one is dumped with py-spy
     if installed, and by faulthandler, then SIGKILLed);
  5. an id whose call raised a KmagentError never reached the host (except a SpoolError
     that says the event "may or may not" be stored); any other exception type, and
     InvalidEvent for these valid events, is a failure;
  6. KM's current person: an event carries the person its thread or task identified.

Adding to it: a pattern is a function ``f(app)`` decorated ``@pattern("name", "what")``
that records through ``app.emit(api, rng)`` until ``app.running()`` is false (``api`` is
one of the adapters ClientAPI/KMAPI/CompatKMAPI, or anything with e/s/a methods);
fork with ``fork_child(app, label, body)``. A fault is ``f(run, rng)`` decorated
``@fault("name", lane="process"|"host")``; it may block for its duration. Operators
are the OPERATOR_COMMANDS table. Everything else (ledgers, oracle, hang checks) follows.

Where things are (tests/torture/, run as ``python tests/torture``, or ``python -m torture``
from tests/): registry.py (Pattern, Fault, the decorators, OPERATOR_COMMANDS, shared
constants); app.py (App, Ledger, the API adapters, threads/fork helpers); the patterns in
patterns_clients.py, patterns_web.py, patterns_processes.py (fork, gunicorn,
multiprocessing, signals), km_logs.py, patterns_cli.py; producer.py (an app process's
main); faults.py; daemon.py; the engine's Run in run.py, made of plan.py (the seed's
plan, the config), watch.py (app processes, stalls), drain.py (the end, cleanup) and
oracle.py (the verdict, Result); hangs.py (stack dumps, kills); cli.py (the command line).
"""

from __future__ import annotations

# Imported in this order: patterns and faults register as their modules load, and
# --list shows them in that order.
from .registry import (API_KEY, FAULTS, HERE, MACHINE_NETWORK_ENV, OPERATOR_COMMANDS,
                       PATTERNS, ROOT, Fault, Pattern, fault, pattern)
from .app import (App, AppOver, ChildExit, ClientAPI, CompatKMAPI, Interrupted, KMAPI,
                  Ledger, construct, fork_child, new_client, reap, run_threads)
from . import patterns_clients, patterns_web, patterns_processes, km_logs, patterns_cli
from .producer import producer_main
from . import faults
from .oracle import Result
from .run import Run, run
from .cli import main, names

__all__ = [
    "API_KEY", "FAULTS", "HERE", "MACHINE_NETWORK_ENV", "OPERATOR_COMMANDS", "PATTERNS", "ROOT",
    "Fault", "Pattern", "fault", "pattern",
    "App", "AppOver", "ChildExit", "ClientAPI", "CompatKMAPI", "Interrupted", "KMAPI", "Ledger",
    "construct", "fork_child", "new_client", "reap", "run_threads",
    "patterns_clients", "patterns_web", "patterns_processes", "km_logs", "patterns_cli",
    "producer_main", "faults", "Result", "Run", "run", "main", "names",
]
