"""Load test of the feedback app against a real uvicorn server on loopback.

    python benchmarks/feedback_load.py --labelers 50 --judgements 10000 [--kill-at 0.4] [--json out.json]

N concurrent labelers (asyncio + httpx, one session each) sign in through the JSON API and loop: fetch the next
assignment, submit a pairwise judgement with a fresh idempotency key. (By default the submit reply carries the
next item, `?next=1`: one round trip per judgement; `--separate-next` uses a GET for it.) A submission that fails (connection refused or
reset, 5xx) is retried with the *same* key until acknowledged. Once `--kill-at` of the target is acknowledged the
server is killed with SIGKILL and restarted on the same database (sessions survive: the secret key is the same).

Checks at the end, against the database: every acknowledged key is stored exactly once, the number of judgement rows
equals the number of distinct keys (no duplicates from retries), no item has more than k labelers and no labeler has
an item twice. Prints one JSON line: p50/p99 submit latency (ms), judgements/s, restart downtime, check results.
Exit status 1 if a check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PASSWORD = "load-test-password"
PROJECT = "load"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(db: str, labelers: int, judgements: int, k: int) -> None:
    from alignloop.feedback.store import Store

    s = Store(db)
    s.create_project(PROJECT, "pairwise", overlap_k=k)
    n_items = -(-judgements // k) + labelers  # a little slack so nobody runs dry near the end
    s.import_records(PROJECT, [{"prompt": f"prompt {i}", "completions": [f"left {i}", f"right {i}"]}
                               for i in range(n_items)])
    for i in range(labelers):
        s.add_labeler(f"lab{i:03d}", PASSWORD)
    s.dispose()


def start_server(db: str, port: int, secret: str) -> subprocess.Popen:
    code = ("import uvicorn; from alignloop.feedback.app import create_app; "
            f"uvicorn.run(create_app({db!r}), host='127.0.0.1', port={port}, log_level='warning', "
            "timeout_keep_alive=30, backlog=2048)")
    env = {**os.environ, "ALIGNLOOP_FEEDBACK_SECRET": secret, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(ROOT))


async def wait_healthy(base: str, timeout: float = 60.0) -> float:
    import httpx

    t0 = time.perf_counter()
    async with httpx.AsyncClient() as c:
        while time.perf_counter() - t0 < timeout:
            try:
                if (await c.get(base + "/healthz", timeout=1.0)).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("server did not come up")


class State:
    def __init__(self, target: int, combined: bool = True, think_s: float = 0.0):
        self.target = target
        self.combined = combined
        self.think_s = think_s
        self.acked: dict[str, int] = {}      # idempotency key -> judgement id
        self.attempted: set[str] = set()
        self.latencies: list[float] = []     # seconds, successful submits (first try)
        self.retried_latencies: list[float] = []
        self.retries = 0
        self.errors: list[str] = []
        self.done = asyncio.Event()


async def labeler(i: int, base: str, st: State) -> None:
    import httpx

    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30.0) as c:
        async def call(method: str, url: str, **kw):
            """Retry through a dead or restarting server; returns the response."""
            delay = 0.05
            while True:
                try:
                    r = await c.request(method, url, **kw)
                    if r.status_code < 500:
                        return r
                except httpx.TransportError:
                    pass
                st.retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

        r = await call("POST", "/api/login", json={"username": f"lab{i:03d}", "password": PASSWORD})
        if r.status_code != 200:
            st.errors.append(f"login {i}: {r.status_code} {r.text[:200]}")
            return
        headers = {"X-CSRF-Token": r.json()["csrf_token"]}
        suffix = "?next=1" if st.combined else ""
        r = await call("GET", f"/api/p/{PROJECT}/next")
        nxt = r.json() if r.status_code == 200 else None
        if nxt is None:
            st.errors.append(f"next {i}: {r.status_code} {r.text[:200]}")
            return
        while len(st.acked) < st.target:
            aid = nxt["assignment_id"]
            if aid is None:
                return
            if st.think_s > 0:  # a human reads and decides: exponential think time
                await asyncio.sleep(random.expovariate(1.0 / st.think_s))
            key = uuid.uuid4().hex
            st.attempted.add(key)
            body = {"choice": "left" if (i + aid) % 3 else "right", "strength": "better", "idempotency_key": key}
            t0 = time.perf_counter()
            retries_before = st.retries
            r = await call("POST", f"/api/assignments/{aid}/judgement{suffix}", json=body, headers=headers)
            dt = time.perf_counter() - t0
            if r.status_code not in (200, 201):
                st.errors.append(f"submit {i}: {r.status_code} {r.text[:200]}")
                return
            reply = r.json()
            st.acked[key] = reply["judgement_id"]
            (st.latencies if st.retries == retries_before else st.retried_latencies).append(dt)
            if st.combined:
                nxt = reply["next"]
            else:
                r = await call("GET", f"/api/p/{PROJECT}/next")
                if r.status_code != 200:
                    st.errors.append(f"next {i}: {r.status_code} {r.text[:200]}")
                    return
                nxt = r.json()
        st.done.set()


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (Linux /proc), 0.0 when unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def verify(db: str, st: State, k: int) -> dict:
    from sqlalchemy import func, select

    from alignloop.feedback.models import Assignment, Judgement
    from alignloop.feedback.store import Store

    s = Store(db, create=False)
    with s.read() as ss:
        rows = ss.execute(select(Judgement.idempotency_key, Judgement.id)).all()
        per_item = ss.execute(select(Assignment.item_id, func.count()).where(Assignment.status != "skipped")
                              .group_by(Assignment.item_id)).all()
        pairs = ss.execute(select(func.count()).select_from(Assignment)).scalar()
        distinct_pairs = ss.execute(select(func.count()).select_from(
            select(Assignment.item_id, Assignment.labeler_id).distinct().subquery())).scalar()
    s.dispose()
    stored = {}
    dup = 0
    for key, jid in rows:
        dup += key in stored
        stored[key] = jid
    missing = [k_ for k_ in st.acked if k_ not in stored]
    wrong_id = [k_ for k_, jid in st.acked.items() if k_ in stored and stored[k_] != jid]
    unknown = [k_ for k_ in stored if k_ not in st.attempted]
    return {"acked": len(st.acked), "stored_rows": len(rows), "acked_missing": len(missing),
            "acked_wrong_id": len(wrong_id), "duplicate_keys": dup, "rows_not_attempted": len(unknown),
            "stored_not_acked": len(set(stored) - set(st.acked)),
            "max_labelers_per_item": max((c for _, c in per_item), default=0), "k": k,
            "duplicate_item_labeler": pairs - distinct_pairs,
            "ok": not missing and not wrong_id and dup == 0 and not unknown
                  and max((c for _, c in per_item), default=0) <= k and pairs == distinct_pairs}


async def run(args) -> dict:
    tmp = None
    db = args.db
    if db is None:
        tmp = tempfile.mkdtemp(prefix="fbload-")
        db = os.path.join(tmp, "load.db")
    t_prep = time.perf_counter()
    prepare(db, args.labelers, args.judgements, args.k)
    t_prep = time.perf_counter() - t_prep
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    secret = uuid.uuid4().hex * 2
    proc = start_server(db, port, secret)
    restarts = []
    server_cpu = [0.0]
    load_before = os.getloadavg()[0]
    try:
        await wait_healthy(base)
        server_cpu[0] -= cpu_seconds(proc.pid)  # startup is not part of the work
        client_cpu0 = time.process_time()
        st = State(args.judgements, combined=not args.separate_next, think_s=args.think_ms / 1000)
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(labeler(i, base, st)) for i in range(args.labelers)]

        async def killer():
            nonlocal proc
            if args.kill_at <= 0:
                return
            while len(st.acked) < args.kill_at * args.judgements:
                if all(t.done() for t in tasks):
                    return
                await asyncio.sleep(0.01)
            t_kill = time.perf_counter()
            acked_at_kill = len(st.acked)
            server_cpu[0] += cpu_seconds(proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc = start_server(db, port, secret)
            up = await wait_healthy(base)
            restarts.append({"acked_at_kill": acked_at_kill, "downtime_s": round(time.perf_counter() - t_kill, 3),
                             "startup_s": round(up, 3)})

        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*tasks)
        await kill_task
        wall = time.perf_counter() - t0
        server_cpu[0] += cpu_seconds(proc.pid)
        client_cpu = time.process_time() - client_cpu0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    check = verify(db, st, args.k)
    downtime = sum(r["downtime_s"] for r in restarts)
    lat = st.latencies
    result = {
        "labelers": args.labelers, "target": args.judgements, "think_ms": args.think_ms,
        "round_trips_per_judgement": 2 if args.separate_next else 1, "acked": len(st.acked),
        "wall_s": round(wall, 2), "judgements_per_s": round(len(st.acked) / wall, 1),
        "judgements_per_s_excluding_restart": round(len(st.acked) / max(1e-9, wall - downtime), 1),
        "submit_p50_ms": round(percentile(lat, 0.50) * 1000, 2), "submit_p99_ms": round(percentile(lat, 0.99) * 1000, 2),
        "submit_max_ms": round(max(lat) * 1000, 2) if lat else None,
        "submits_retried_across_restart": len(st.retried_latencies), "transport_retries": st.retries,
        "server_cpu_ms_per_judgement": round(1000 * server_cpu[0] / max(1, len(st.acked)), 2),
        "client_cpu_ms_per_judgement": round(1000 * client_cpu / max(1, len(st.acked)), 2),
        "cpu_cores": os.cpu_count(), "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "restarts": restarts, "errors": st.errors[:10], "prepare_s": round(t_prep, 2), "check": check,
        "db": db,
    }
    if tmp and not args.keep_db:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labelers", type=int, default=50)
    ap.add_argument("--judgements", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=3, help="overlap k of the project")
    ap.add_argument("--kill-at", type=float, default=0.4, help="kill+restart the server at this share (0: never)")
    ap.add_argument("--db", default=None, help="SQLite path (default: a temporary folder)")
    ap.add_argument("--keep-db", action="store_true")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--think-ms", type=float, default=0.0,
                    help="mean think time per item (exponential); 0 = closed loop at full speed (a stress test)")
    ap.add_argument("--separate-next", action="store_true",
                    help="fetch the next item with its own GET (default: the submit reply carries it, ?next=1)")
    args = ap.parse_args(argv)
    result = asyncio.run(run(args))
    line = json.dumps(result)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0 if result["check"]["ok"] and not result["errors"] and result["acked"] >= args.judgements else 1


if __name__ == "__main__":
    sys.exit(main())
