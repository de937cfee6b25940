"""One PySyncObj member for ``bench/raft_bench.py``: a replicated counter, driven over stdio.

Not part of controlplane and never imported by it: ``raft_bench.py`` runs three of these with
the Python of a separate virtual environment that has ``pysyncobj`` installed (the project's own
environment stays clean). Usage::

    python pysyncobj_node.py SELF_ADDR PARTNER_ADDR PARTNER_ADDR [--min-timeout S --max-timeout S]

``SyncObjConf`` keeps its defaults (election timeout random in [0.4, 1.4) s, append-entries
period 0.1 s, no journal file: the log lives in memory and nothing is fsynced) unless the
timeouts are given. The process answers one JSON object per line on stdout for each JSON
command read from stdin:

- ``{"op": "status"}``: this member's state, leader, commit and applied indices;
- ``{"op": "seq", "n": N}``: N sequential ``sync=True`` calls; their latencies in seconds;
- ``{"op": "throughput", "concurrency": C, "seconds": S}``: keeps C calls in flight (callback
  style, as PySyncObj's own benchmarks/testobj.py issues them) for S seconds; commits counted;
- ``{"op": "failover", "old_leader": ADDR, "poll": S, "deadline": S}``: starts a new call every
  ``poll`` seconds until one succeeds; reports ``time.monotonic()`` (system-wide on Linux, so
  comparable with the driver's clock) of the first success and of the first new leader seen;
  ``"write": false`` only watches for the new leader;
- ``{"op": "quit"}``.

Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated


class Store(SyncObj):
    """A replicated counter and dict."""

    def __init__(self, self_addr: str, partners: list[str], conf: SyncObjConf) -> None:
        super().__init__(self_addr, partners, conf)
        self.counter = 0
        self.data: dict[str, Any] = {}

    @replicated
    def incr(self) -> int:
        self.counter += 1
        return self.counter

    @replicated
    def set(self, key: str, value: Any) -> None:
        self.data[key] = value


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def status(store: Store) -> dict[str, Any]:
    st = store.getStatus()
    leader = st.get("leader")
    return {
        "state": st.get("state"),  # 0 follower, 1 candidate, 2 leader
        "leader": str(leader) if leader is not None else None,
        "self": str(st.get("self")),
        "commit": st.get("commit_idx"),
        "applied": st.get("last_applied"),
        "ready": store.isReady(),
    }


def sequential(store: Store, n: int) -> dict[str, Any]:
    latencies = []
    errors = 0
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            store.incr(sync=True, timeout=5.0)
        except Exception:
            errors += 1
            continue
        latencies.append(time.perf_counter() - t0)
    return {"latencies": latencies, "errors": errors}


def throughput(store: Store, concurrency: int, seconds: float) -> dict[str, Any]:
    lock = threading.Lock()
    counts = {"ok": 0, "err": 0}
    stop_at = [0.0]
    done = threading.Event()
    in_flight = [0]

    def callback(result: Any, err: int) -> None:
        with lock:
            if err == FAIL_REASON.SUCCESS:
                counts["ok"] += 1
            else:
                counts["err"] += 1
            if time.monotonic() < stop_at[0]:
                issue = True
            else:
                issue = False
                in_flight[0] -= 1
                if in_flight[0] == 0:
                    done.set()
        if issue:
            store.incr(callback=callback)

    start_count = store.counter
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    in_flight[0] = concurrency
    for _ in range(concurrency):
        store.incr(callback=callback)
    done.wait(seconds + 30.0)
    elapsed = time.monotonic() - t0
    return {
        "ok": counts["ok"],
        "errors": counts["err"],
        "elapsed": elapsed,
        "applied": store.counter - start_count,
    }


def failover(
    store: Store, old_leader: str, poll: float, deadline: float, write: bool = True
) -> dict[str, Any]:
    first: dict[str, float] = {}
    lock = threading.Lock()
    success = threading.Event()
    attempts = 0

    def callback(result: Any, err: int) -> None:
        if err == FAIL_REASON.SUCCESS:
            now = time.monotonic()
            with lock:
                first.setdefault("success", now)
            success.set()

    end = time.monotonic() + deadline
    leader_at = None
    while not success.is_set() and time.monotonic() < end:
        leader = store._getLeader()
        if leader_at is None and leader is not None and str(leader) != old_leader:
            leader_at = time.monotonic()
        if write:
            store.set("failover", attempts, callback=callback)
            attempts += 1
        elif leader_at is not None:
            break
        success.wait(poll)
    if leader_at is None:
        leader = store._getLeader()
        if leader is not None and str(leader) != old_leader:
            leader_at = time.monotonic()
    return {"success_at": first.get("success"), "leader_at": leader_at, "attempts": attempts}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("self_addr")
    parser.add_argument("partners", nargs="+")
    parser.add_argument("--min-timeout", type=float)
    parser.add_argument("--max-timeout", type=float)
    parser.add_argument("--no-batch", action="store_true", help="appendEntriesUseBatch=False")
    args = parser.parse_args()
    options: dict[str, Any] = {}
    if args.min_timeout is not None:
        options["raftMinTimeout"] = args.min_timeout
    if args.max_timeout is not None:
        options["raftMaxTimeout"] = args.max_timeout
    if args.no_batch:
        options["appendEntriesUseBatch"] = False
    conf = SyncObjConf(**options)
    store = Store(args.self_addr, args.partners, conf)
    reply(
        {
            "started": True,
            "raftMinTimeout": conf.raftMinTimeout,
            "raftMaxTimeout": conf.raftMaxTimeout,
            "appendEntriesPeriod": conf.appendEntriesPeriod,
            "journalFile": conf.journalFile,
            "appendEntriesUseBatch": conf.appendEntriesUseBatch,
        }
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "status":
            reply(status(store))
        elif op == "seq":
            reply(sequential(store, int(cmd["n"])))
        elif op == "throughput":
            reply(throughput(store, int(cmd["concurrency"]), float(cmd["seconds"])))
        elif op == "failover":
            reply(
                failover(
                    store,
                    cmd["old_leader"],
                    float(cmd["poll"]),
                    float(cmd["deadline"]),
                    bool(cmd.get("write", True)),
                )
            )
        elif op == "quit":
            reply({"bye": True})
            break
        else:
            reply({"error": f"unknown op {op!r}"})
    store.destroy()


if __name__ == "__main__":
    main()
