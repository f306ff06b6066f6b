"""Load test of the feedback app against a real uvicorn server on loopback.

    python benchmarks/feedback_load.py --labelers 50 --judgements 10000 [--kill-at 0.4] [--pin] [--json out.json]

N concurrent labelers (asyncio streams with keep-alive, one connection and one session each; uvloop when installed)
first sign in through the JSON API (`POST /api/login`, argon2) and fetch their first item; once all have signed in
(timed separately: `sign_in_s`) they loop: submit a pairwise judgement with a fresh idempotency key. By default the
submit reply carries the next item (`?next=1`: one round trip per judgement); `--separate-next` takes it with its
own `POST /api/p/<project>/next` (a GET never hands out an item).
A submission that fails (connection refused or reset, 5xx) is retried with the *same* key until acknowledged; a
judgement counts as acknowledged only when its 200/201 reply has been read (the server replies after COMMIT). Once
`--kill-at` of the target is acknowledged the server is killed with SIGKILL and restarted on the same database
(sessions survive: the secret key is the same).

The server runs as `alignloop feedback serve` runs it: uvicorn (uvloop + httptools when installed, access log off),
one process. `--pin` pins the server to one core and this load generator to another. `--think-ms` adds an
exponential think time per item (a human pace; the default 0 is a closed loop at full speed, a stress test).

Checks at the end, against the database: every acknowledged key is stored exactly once, the number of judgement rows
equals the number of distinct keys (no duplicates from retries), no item has more than k labelers and no labeler has
an item twice. Prints one JSON line: submit latency p50/p99 (end to end, first tries; `submit_p99_all_ms` includes
the submissions retried across the restart), judgements/s over the labeling phase (restart downtime included;
`judgements_per_s_including_sign_in` counts the sign-in phase too), restart downtime, server and client CPU per
judgement, the load generator's own worst event-loop lag, and the check results. Exit status 1 if a check fails.

`--import-rows N`: once labeling starts, an admin uploads an N-row JSONL file (one prompt with 2 completions and an
`id` per row) into a second project through the app's own import route (`POST /admin/p/<id>/import`, the admin
page's upload: read whole, checked, then written in short batches while the labelers go on). An upload cut by the
kill is sent again (imports are idempotent: it adds what is missing). Reported under "import": its attempts, their
statuses and seconds; checked: the project then holds exactly N prompts and N items, and no request got a 500
(`http_5xx` counts every status >= 500 the labelers saw; `submits_over_1s` the first tries slower than 1 s).
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
BULK, BULK_ID = "bulk", 2  # the project --import-rows imports into (created second)
ADMIN = "loadadmin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(db: str, labelers: int, judgements: int, k: int, import_rows: int = 0) -> bytes | None:
    """Create the labeling project, its items and the labelers; with `import_rows`, also the project the admin
    imports into, the admin, and the upload (returned: the JSONL file's bytes)."""
    from alignloop.feedback.store import Store

    s = Store(db)
    s.create_project(PROJECT, "pairwise", overlap_k=k)
    n_items = -(-judgements // k) + labelers  # a little slack so nobody runs dry near the end
    s.import_records(PROJECT, [{"prompt": f"prompt {i}", "completions": [f"left {i}", f"right {i}"]}
                               for i in range(n_items)])
    for i in range(labelers):
        s.add_labeler(f"lab{i:03d}", PASSWORD)
    upload = None
    if import_rows:
        s.create_project(BULK, "pairwise", overlap_k=1)  # its id is 2 (BULK_ID)
        s.add_labeler(ADMIN, PASSWORD, role="admin")
        upload = "".join(json.dumps({"id": f"row-{i}", "prompt": f"bulk prompt {i}: say something useful",
                                     "completions": [f"first answer {i}", f"second answer {i}"]}) + "\n"
                         for i in range(import_rows)).encode()
    s.dispose()
    return upload


def start_server(db: str, port: int, secret: str, cpu: int | None = None) -> subprocess.Popen:
    """uvicorn as `alignloop feedback serve` runs it (uvloop and httptools when installed: the `web` extra pulls
    `uvicorn[standard]`), access log off. `cpu`: pin the server process to that core."""
    code = ("import uvicorn; from alignloop.feedback.app import create_app; "
            f"uvicorn.run(create_app({db!r}), host='127.0.0.1', port={port}, log_level='warning', "
            "access_log=False, timeout_keep_alive=30, backlog=2048)")
    env = {**os.environ, "ALIGNLOOP_FEEDBACK_SECRET": secret, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(ROOT))
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    return proc


class HTTPConn:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: one connection, one request at a time, the session
    cookie kept (the app's only cookie). Much lighter than httpx, so the load generator takes less of the CPU the
    server needs; latency is still measured end to end (request written -> whole response read)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None
        self.cookie = ""

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None):
        """(status, body bytes); raises OSError / asyncio.IncompleteReadError / ConnectionError on transport
        failures (the connection is then closed)."""
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            head = f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            if self.cookie:
                head += f"cookie: {self.cookie}\r\n"
            for k, v in (headers or {}).items():
                head += f"{k}: {v}\r\n"
            if body or method == "POST":
                if not any(k.lower() == "content-type" for k in headers or {}):
                    head += "content-type: application/json\r\n"
                head += f"content-length: {len(body)}\r\n"
            self.writer.write(head.encode("latin-1") + b"\r\n" + body)
            status, length, chunked, close = await self._read_head()
            if chunked:
                data = await self._read_chunked()
            else:
                data = await self.reader.readexactly(length) if length else b""
            if close:
                await self.close()
            return status, data
        except BaseException:
            await self.close()
            raise

    async def _read_head(self) -> tuple[int, int, bool, bool]:
        """The response head: (status, content length, chunked, connection: close); keeps the session cookie."""
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, chunked, close = 0, False, False
        for line in lines[1:]:
            if not line:
                continue
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name == "connection" and value.lower() == "close":
                close = True
            elif name == "set-cookie":
                self._keep_cookie(value)
        return status, length, chunked, close

    def _keep_cookie(self, value: str) -> None:
        pair = value.split(";", 1)[0]
        cname, _, cval = pair.partition("=")
        if cname.strip() == "alignloop_session":
            self.cookie = "" if cval in ("", "null") or "max-age=0" in value.lower() else pair

    async def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)


TRANSPORT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError)


async def wait_healthy(host: str, port: int, timeout: float = 60.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        c = HTTPConn(host, port)
        try:
            async with asyncio.timeout(1.0):
                status, _ = await c.request("GET", "/healthz")
            if status == 200:
                return time.perf_counter() - t0
        except (*TRANSPORT_ERRORS, TimeoutError):
            pass
        finally:
            await c.close()
        await asyncio.sleep(0.05)
    raise RuntimeError("server did not come up")


class State:
    def __init__(self, target: int, labelers: int, combined: bool = True, think_s: float = 0.0):
        self.target = target
        self.combined = combined
        self.think_s = think_s
        self.acked: dict[str, int] = {}      # idempotency key -> judgement id
        self.attempted: set[str] = set()
        self.latencies: list[float] = []     # seconds, successful submits (first try)
        self.retried_latencies: list[float] = []
        self.trace: list[tuple[float, float, bool]] = []  # (sent at, latency, retried) per acknowledged submit
        self.retries = 0
        self.http_5xx: dict[int, int] = {}  # status -> count, every reply >= 500 a labeler got (then retried)
        self.errors: list[str] = []
        self.signed_in = 0
        self.all_signed_in = asyncio.Event()  # labeling starts once everybody has signed in (timed separately)
        self.labelers = labelers
        self.t_sign_in_done = 0.0


class Labeler:
    """One simulated labeler: its connection, its CSRF header and its calls (retried through a dead or restarting
    server)."""

    def __init__(self, i: int, host: str, port: int, st: State):
        self.i, self.st = i, st
        self.c = HTTPConn(host, port)
        self.headers: dict = {}

    async def call(self, method: str, url: str, body: bytes = b"", headers: dict | None = None):
        """Retry through a dead or restarting server; returns (status, body)."""
        delay = 0.05
        while True:
            try:
                async with asyncio.timeout(30.0):
                    status, data = await self.c.request(method, url, body, headers)
                if status < 500:
                    return status, data
                self.st.http_5xx[status] = self.st.http_5xx.get(status, 0) + 1
            except (*TRANSPORT_ERRORS, TimeoutError):
                pass
            self.st.retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def fetch_next(self) -> dict | None:
        status, data = await self.call("POST", f"/api/p/{PROJECT}/next", headers=self.headers)
        if status != 200:
            self.st.errors.append(f"next {self.i}: {status} {data[:200]!r}")
            return None
        return json.loads(data)

    async def sign_in(self) -> dict | None:
        """Sign in and fetch the first item (None: failed, reported in st.errors)."""
        status, data = await self.call("POST", "/api/login", json.dumps(
            {"username": f"lab{self.i:03d}", "password": PASSWORD}).encode())
        if status != 200:
            self.st.errors.append(f"login {self.i}: {status} {data[:200]!r}")
            return None
        self.headers = {"x-csrf-token": json.loads(data)["csrf_token"]}
        return await self.fetch_next()

    async def submit(self, aid: int) -> dict | None:
        """Judge assignment `aid` with a fresh key (retried with the same key until acknowledged); returns the next
        item (None: failed or nothing left)."""
        st = self.st
        if st.think_s > 0:  # a human reads and decides: exponential think time
            await asyncio.sleep(random.expovariate(1.0 / st.think_s))
        key = uuid.uuid4().hex
        st.attempted.add(key)
        body = json.dumps({"choice": "left" if (self.i + aid) % 3 else "right", "strength": "better",
                           "idempotency_key": key}).encode()
        suffix = "?next=1" if st.combined else ""
        t0 = time.perf_counter()
        retries_before = st.retries
        status, data = await self.call("POST", f"/api/assignments/{aid}/judgement{suffix}", body, self.headers)
        dt = time.perf_counter() - t0
        if status not in (200, 201):
            st.errors.append(f"submit {self.i}: {status} {data[:200]!r}")
            return None
        reply = json.loads(data)
        st.acked[key] = reply["judgement_id"]
        (st.latencies if st.retries == retries_before else st.retried_latencies).append(dt)
        st.trace.append((t0, dt, st.retries != retries_before))
        return reply["next"] if st.combined else await self.fetch_next()


async def labeler(i: int, host: str, port: int, st: State) -> None:
    lab = Labeler(i, host, port, st)
    try:
        try:
            nxt = await lab.sign_in()
        finally:
            st.signed_in += 1
            if st.signed_in == st.labelers:
                st.t_sign_in_done = time.perf_counter()
                st.all_signed_in.set()
        if nxt is None:
            return
        await st.all_signed_in.wait()
        while len(st.acked) < st.target and nxt is not None and nxt["assignment_id"] is not None:
            nxt = await lab.submit(nxt["assignment_id"])
    finally:
        await lab.c.close()


def multipart(boundary: str, csrf: str, name: str, data: bytes) -> bytes:
    """A multipart/form-data body: the CSRF field and one file."""
    b = f"--{boundary}\r\n".encode()
    return (b + b'content-disposition: form-data; name="csrf_token"\r\n\r\n' + csrf.encode() + b"\r\n" + b
            + f'content-disposition: form-data; name="file"; filename="{name}"\r\n'.encode()
            + b"content-type: application/jsonl\r\n\r\n" + data + f"\r\n--{boundary}--\r\n".encode())


async def admin_import(host: str, port: int, upload: bytes, st: State, report: dict) -> None:
    """Once labeling has started, an admin signs in and uploads `upload` to the import route of BULK; sent again
    after a transport failure or a reply >= 500 (the kill) until answered. Fills `report`."""
    await st.all_signed_in.wait()
    c = HTTPConn(host, port)
    boundary = uuid.uuid4().hex
    t0 = time.perf_counter()
    csrf = None
    try:
        while True:
            report["attempts"] += 1
            try:
                async with asyncio.timeout(600.0):
                    if csrf is None:
                        status, data = await c.request("POST", "/api/login", json.dumps(
                            {"username": ADMIN, "password": PASSWORD}).encode())
                        if status != 200:
                            raise ConnectionError(f"admin sign-in: {status}")
                        csrf = json.loads(data)["csrf_token"]
                    t1 = time.perf_counter()
                    status, data = await c.request(
                        "POST", f"/admin/p/{BULK_ID}/import", multipart(boundary, csrf, "bulk.jsonl", upload),
                        {"content-type": f"multipart/form-data; boundary={boundary}"})
                report["statuses"].append(status)
                report["attempt_s"].append(round(time.perf_counter() - t1, 2))
                if status < 500:
                    if status != 200:
                        st.errors.append(f"import: {status} {data[:300]!r}")
                    break
            except (*TRANSPORT_ERRORS, TimeoutError, ConnectionError) as e:
                report["statuses"].append(type(e).__name__)
            await asyncio.sleep(0.5)
    finally:
        report["seconds"] = round(time.perf_counter() - t0, 2)
        await c.close()


def verify_import(db: str, rows: int) -> dict:
    """The BULK project after the import: exactly `rows` prompts and items (one pair each), none twice."""
    from sqlalchemy import func, select

    from alignloop.feedback.models import Item, Prompt
    from alignloop.feedback.store import Store

    s = Store(db, create=False)
    with s.read() as ss:
        prompts = ss.scalar(select(func.count()).select_from(Prompt).where(Prompt.project_id == BULK_ID))
        keys = ss.scalar(select(func.count(func.distinct(Prompt.source_key))).where(Prompt.project_id == BULK_ID))
        items = ss.scalar(select(func.count()).select_from(Item).where(Item.project_id == BULK_ID))
    s.dispose()
    return {"rows": rows, "prompts_stored": prompts, "distinct_keys": keys, "items_stored": items,
            "ok": prompts == keys == items == rows}


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
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


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


def _module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


async def run(args) -> dict:
    tmp = None
    db = args.db
    if db is None:
        tmp = tempfile.mkdtemp(prefix="fbload-")
        db = os.path.join(tmp, "load.db")
    t_prep = time.perf_counter()
    upload = prepare(db, args.labelers, args.judgements, args.k, args.import_rows)
    t_prep = time.perf_counter() - t_prep
    imp = {"attempts": 0, "statuses": [], "attempt_s": [], "seconds": None}
    port = args.port or free_port()
    host = "127.0.0.1"
    secret = uuid.uuid4().hex * 2
    server_core = client_core = None
    affinity = os.sched_getaffinity(0)
    if args.pin:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            raise SystemExit("--pin needs at least 2 cores")
        server_core, client_core = cores[0], cores[1]
        os.sched_setaffinity(0, {client_core})
    proc = start_server(db, port, secret, server_core)
    restarts = []
    server_cpu = [0.0]  # server CPU seconds during the labeling phase (startups and sign-ins excluded)
    load_before = os.getloadavg()[0]
    st = State(args.judgements, args.labelers, combined=not args.separate_next, think_s=args.think_ms / 1000)
    try:
        await wait_healthy(host, port)
        import gc
        gc.collect()
        gc.freeze()  # this process's own full collections would otherwise add tens of ms to measured latencies
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(labeler(i, host, port, st)) for i in range(args.labelers)]
        import_task = asyncio.create_task(admin_import(host, port, upload, st, imp)) if upload else None
        await st.all_signed_in.wait()
        t_label = st.t_sign_in_done
        server_cpu[0] -= cpu_seconds(proc.pid)
        client_cpu0 = time.process_time()

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
            proc = start_server(db, port, secret, server_core)
            up = await wait_healthy(host, port)
            server_cpu[0] -= cpu_seconds(proc.pid)
            restarts.append({"acked_at_kill": acked_at_kill, "downtime_s": round(time.perf_counter() - t_kill, 3),
                             "startup_s": round(up, 3)})

        lag = [0.0]

        async def lag_monitor():
            """The largest delay of this process's own event loop (a 10 ms sleep that woke late): a stalled load
            generator would show up as server latency."""
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.01)
                lag[0] = max(lag[0], time.perf_counter() - t - 0.01)

        kill_task = asyncio.create_task(killer())
        lag_task = asyncio.create_task(lag_monitor())
        await asyncio.gather(*tasks)
        await kill_task
        t_end = time.perf_counter()  # the labeling is done (an import may still run: not counted in its rates)
        server_cpu[0] += cpu_seconds(proc.pid)
        client_cpu = time.process_time() - client_cpu0
        if import_task is not None:
            await import_task
        lag_task.cancel()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.sched_setaffinity(0, affinity)  # run() may be called inside a longer process (the tests)
    check = verify(db, st, args.k)
    if upload:
        imp.update(verify_import(db, args.import_rows))
    downtime = sum(r["downtime_s"] for r in restarts)
    wall = t_end - t_label
    lat = st.latencies
    every = st.latencies + st.retried_latencies
    n = len(st.acked)
    result = {
        "labelers": args.labelers, "target": args.judgements, "think_ms": args.think_ms,
        "round_trips_per_judgement": 2 if args.separate_next else 1, "acked": n,
        "sign_in_s": round(t_label - t0, 2),
        "wall_s": round(wall, 2), "judgements_per_s": round(n / wall, 1),
        "judgements_per_s_excluding_restart": round(n / max(1e-9, wall - downtime), 1),
        "judgements_per_s_including_sign_in": round(n / (t_end - t0), 1),
        "offered_per_s": (round(args.labelers / (args.think_ms / 1000), 1) if args.think_ms > 0 else None),
        "submit_p50_ms": round(percentile(lat, 0.50) * 1000, 2),
        "submit_p99_ms": round(percentile(lat, 0.99) * 1000, 2),
        "submit_max_ms": round(max(lat) * 1000, 2) if lat else None,
        "submits_over_1s": sum(x > 1.0 for x in lat),
        "http_5xx": st.http_5xx,
        "submit_p99_all_ms": round(percentile(every, 0.99) * 1000, 2),
        "submits_retried_across_restart": len(st.retried_latencies), "transport_retries": st.retries,
        "server_cpu_ms_per_judgement": round(1000 * server_cpu[0] / max(1, n), 3),
        "client_cpu_ms_per_judgement": round(1000 * client_cpu / max(1, n), 3),
        "client_loop_max_lag_ms": round(lag[0] * 1000, 1),
        "pinned": {"server_core": server_core, "client_core": client_core} if args.pin else None,
        "uvloop": _module_available("uvloop"), "httptools": _module_available("httptools"),
        "cpu_cores": os.cpu_count(), "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "restarts": restarts, "errors": st.errors[:10], "prepare_s": round(t_prep, 2), "check": check,
        "import": imp if upload else None,
        "db": db,
    }
    if args.trace:
        Path(args.trace).write_text("".join(f"{t - t_label:.4f} {dt * 1000:.2f} {int(r)}\n" for t, dt, r in st.trace))
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
                    help="take the next item with its own POST (default: the submit reply carries it, ?next=1)")
    ap.add_argument("--trace", default=None,
                    help="write one line per acknowledged submit: seconds since labeling began, latency ms, retried")
    ap.add_argument("--import-rows", type=int, default=0,
                    help="an admin uploads this many rows to the app's import route once labeling starts")
    ap.add_argument("--pin", action="store_true",
                    help="pin the server to the first allowed core and this load generator to the second")
    args = ap.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    line = json.dumps(result)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    ok = result["check"]["ok"] and not result["errors"] and result["acked"] >= args.judgements
    ok = ok and 500 not in result["http_5xx"] and (result["import"] is None or result["import"]["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
