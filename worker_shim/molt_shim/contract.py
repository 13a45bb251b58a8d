"""The master <-> worker contract, Python side: message keys, exit codes, environment names and
the fd layout a worker is started with.

The C++ side is supervisor/contract/worker_contract.hpp; tests/integration/test_contract.py fails
when the two disagree. docs/protocol.md is the prose form of the same facts.
"""
from __future__ import annotations

import enum
from typing import Dict, List, Tuple


class WorkerExit(enum.IntEnum):
    """How a worker process ends. Anything else is a crash."""

    OK = 0  # drained (or asked to stop) and exited cleanly
    IMPORT_FAILED = 3  # the app (or the shim, or uvicorn for ASGI) could not be imported
    WARMUP_FAILED = 4  # the warm-up request did not pass
    LIFESPAN_FAILED = 5  # the app's ASGI lifespan startup failed


class Key:
    """Message keys (sd_notify syntax, KEY=VALUE lines, one message per SEQPACKET packet)."""

    # worker -> master
    READY = "READY"
    WATCHDOG = "WATCHDOG"
    REQUESTS = "REQUESTS"
    INFLIGHT = "INFLIGHT"
    OLDEST_MS = "OLDEST_MS"
    RSS = "RSS"
    ERROR = "ERROR"
    RETIRE = "RETIRE"
    STOPPING = "STOPPING"
    # zygote -> master (the zygote also sends READY and ERROR, with a worker's meaning)
    FORKED = "FORKED"  # FORK=<id> done: with PID= or FORK_ERROR=
    PID = "PID"  # the forked worker's pid
    FORK_ERROR = "FORK_ERROR"  # why FORK=<id> produced no worker
    PRELOAD_REFUSED = "PRELOAD_REFUSED"  # preload: auto found the import unsafe to fork
    DURATIONS = "DURATIONS"  # request durations by status class (molt_shim/request_metrics.py)
    EXCEPTIONS = "EXCEPTIONS"  # exceptions raised by the app so far
    # zygote -> master: STANDBY= done, the standby's pid (or STANDBY_ERROR= saying why not)
    STANDBY_PID = "STANDBY_PID"
    STANDBY_ERROR = "STANDBY_ERROR"
    # zygote -> master: the pid of its spare (a worker forked ahead, waiting for the next
    # FORK=), once it waits; 0 once it was handed a request or found dead
    SPARE_PID = "SPARE_PID"
    # master -> worker
    DRAIN = "DRAIN"
    REOPEN_LOGS = "REOPEN_LOGS"
    # master -> zygote: fork worker <id> for SLOT=; channel, stdout, stderr as SCM_RIGHTS
    FORK = "FORK"
    SLOT = "SLOT"
    # master -> zygote, before its import: fork a standby (the next generation's zygote,
    # paused before the import) on the channel, stdout and stderr sent as SCM_RIGHTS
    STANDBY = "STANDBY"
    # master -> standby: become this generation's zygote. JSON: {"cwd": the release
    # directory, "env": the variables that differ, "drop": the variables to remove}
    START = "START"


WORKER_TO_MASTER_KEYS: Tuple[str, ...] = (
    Key.READY, Key.WATCHDOG, Key.REQUESTS, Key.INFLIGHT, Key.OLDEST_MS, Key.RSS, Key.ERROR,
    Key.RETIRE, Key.STOPPING, Key.FORKED, Key.PID, Key.FORK_ERROR, Key.PRELOAD_REFUSED,
    Key.DURATIONS, Key.EXCEPTIONS, Key.STANDBY_PID, Key.STANDBY_ERROR, Key.SPARE_PID)
MASTER_TO_WORKER_KEYS: Tuple[str, ...] = (Key.DRAIN, Key.REOPEN_LOGS, Key.FORK, Key.SLOT,
                                          Key.STANDBY, Key.START)


class Env:
    """The environment a worker is started with."""

    CHANNEL_FD = "MOLT_CHANNEL_FD"
    LISTEN_FDS = "MOLT_LISTEN_FDS"  # e.g. "3,4"
    LISTEN_NAMES = "MOLT_LISTEN_NAMES"  # ","-separated, one per fd
    GENERATION = "MOLT_GENERATION"
    WORKER = "MOLT_WORKER"  # the slot
    WORKER_CONFIG = "MOLT_WORKER_CONFIG"  # JSON
    ZYGOTE = "MOLT_ZYGOTE"  # "1": this process is its generation's zygote
    # 160 hex digits: the generation's TLS session-ticket keys, the same in each of its workers
    # so that a client resumes its session on whichever worker it reaches. Only with TLS.
    TLS_TICKET_KEYS = "MOLT_TLS_TICKET_KEYS"
    # The master's accept board, shared memory where each worker says how many connections it
    # holds, so that a generation's workers keep their share of them (native engine).
    ACCEPT_BOARD_FD = "MOLT_ACCEPT_BOARD_FD"


WORKER_ENV_NAMES: Tuple[str, ...] = (
    Env.CHANNEL_FD, Env.LISTEN_FDS, Env.LISTEN_NAMES, Env.GENERATION, Env.WORKER,
    Env.WORKER_CONFIG, Env.ZYGOTE, Env.TLS_TICKET_KEYS, Env.ACCEPT_BOARD_FD)

# Variables of the master's own environment that never reach a worker: they belong to the
# master's supervisor (systemd) or to the master itself. The master removes them before it adds
# the worker's own MOLT_* names; the worker removes the non-MOLT ones again in case it was
# started some other way.
SCRUBBED_NAMES: Tuple[str, ...] = ("NOTIFY_SOCKET",)
SCRUBBED_PREFIXES: Tuple[str, ...] = ("LISTEN_", "WATCHDOG_", "MOLT_")


def is_scrubbed(name: str) -> bool:
    return name in SCRUBBED_NAMES or name.startswith(SCRUBBED_PREFIXES)


# The fd layout: listeners at FIRST_LISTEN_FD, FIRST_LISTEN_FD + 1, ... in config order, and
# the channel right after the last listener.
FIRST_LISTEN_FD = 3


def channel_fd_for(listener_count: int) -> int:
    return FIRST_LISTEN_FD + listener_count


def as_json() -> Dict[str, object]:
    """The contract in the form molt_contract_dump prints the C++ side, for the agreement test."""
    exits: Dict[str, int] = {member.name.lower(): int(member) for member in WorkerExit}
    return {
        "exit": exits,
        "worker_to_master_keys": list(WORKER_TO_MASTER_KEYS),
        "master_to_worker_keys": list(MASTER_TO_WORKER_KEYS),
        "worker_env_names": list(WORKER_ENV_NAMES),
        "scrubbed_names": list(SCRUBBED_NAMES),
        "scrubbed_prefixes": list(SCRUBBED_PREFIXES),
        "first_listen_fd": FIRST_LISTEN_FD,
    }


__all__: List[str] = [
    "WorkerExit", "Key", "Env", "WORKER_TO_MASTER_KEYS", "MASTER_TO_WORKER_KEYS",
    "WORKER_ENV_NAMES", "SCRUBBED_NAMES", "SCRUBBED_PREFIXES", "is_scrubbed", "FIRST_LISTEN_FD",
    "channel_fd_for", "as_json"]
