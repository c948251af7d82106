#!/usr/bin/env python3
"""The runcache benchmark behind bench/run.sh (standard library only).

Starts, on loopback only: a private redis-server, the sample origin with a fixed delay (and a
second one with none, for the miss path), runcache in release mode (default configuration;
Redis only; memory tier only), nginx as a proxy_cache, and a bare axum handler serving a
static body of the same size (the framework's ceiling). Then it warms the same URLs in each,
measures hits with wrk in alternating rounds, a cold-key stampede, the miss-path overhead,
invalidation cost against the size of the keyspace, a large pattern clear, how long a
backlog of 10,000 queued stream events takes to apply (one Redis, and a cluster), and the
origin calls that a Redis SIGKILL under load costs, and prints one table, also written as
Markdown and JSON under bench/results/.
"""

import argparse
import asyncio
import concurrent.futures
import datetime
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target/release/runcache"
CEILING = ROOT / "target/release/examples/ceiling"
TOKEN = "bench-token"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ORIGIN_DELAY_MS = 50


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Processes:
    """Every process the benchmark starts, stopped together at the end."""

    def __init__(self, scratch):
        self.procs = []
        self.scratch = scratch

    def start(self, name, cmd, env=None, cwd=None):
        out = open(self.scratch / f"{name}.log", "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                             stdin=subprocess.DEVNULL, cwd=cwd)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_http(url, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                r.read()
                return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def http_call(port, method, path, body=None, headers=None):
    """One request on a fresh connection; returns (status, headers, body, seconds)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    t0 = time.perf_counter()
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    elapsed = time.perf_counter() - t0
    conn.close()
    return resp.status, dict(resp.getheaders()), data, elapsed


def admin_headers():
    return {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def redis_cli(port, *args):
    out = subprocess.run(["redis-cli", "-p", str(port), *map(str, args)],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def origin_calls(port):
    _, _, body, _ = http_call(port, "GET", "/_sample/calls")
    return json.loads(body)["calls"]


def cpu_seconds(pids):
    """User plus system CPU of these processes and their children threads, in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / CLK_TCK


def child_pids(pid):
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]
    except FileNotFoundError:
        return []


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_latency(text):
    m = re.match(r"([\d.]+)(us|ms|s)$", text)
    return float(m.group(1)) * UNITS[m.group(2)] if m else float("nan")


def run_wrk(port, conns, secs, paths_file, pids):
    cpu0 = cpu_seconds(pids)
    out = subprocess.run(
        ["wrk", "-t2", f"-c{conns}", f"-d{secs}s", "--latency", "-s",
         str(ROOT / "bench/urls.lua"), f"http://127.0.0.1:{port}", "--", str(paths_file)],
        capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(pids) - cpu0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p50 = parse_latency(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = parse_latency(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps, "p50_ms": p50, "p99_ms": p99, "requests": total,
        "cpu_us_per_req": cpu / total * 1e6 if total else float("nan"),
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else None,
    }


def warm(port, paths, check_header, check_value, threads=64):
    """Requests every path (so it is cached), then checks a sample is now a hit."""
    def get(path):
        status, _, _, _ = http_call(port, "GET", path)
        return status

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        statuses = list(pool.map(get, paths))
    if any(s != 200 for s in statuses):
        raise RuntimeError(f"warming port {port}: statuses {set(statuses)}")
    hits = 0
    sample = paths[:: max(1, len(paths) // 50)]
    for path in sample:
        _, headers, _, _ = http_call(port, "GET", path)
        lower = {k.lower(): v for k, v in headers.items()}
        hits += lower.get(check_header, "").startswith(check_value)
    return hits, len(sample)


async def stampede_async(port, path, n):
    """Opens n connections, then sends one request on each at once; returns per-request
    seconds from the moment the requests were sent, and the statuses."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()

    async def one(reader, t0):
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
        await reader.readexactly(length)
        return time.perf_counter() - t0, status

    t0 = time.perf_counter()
    for _, writer in conns:
        writer.write(request)
    results = await asyncio.gather(*(one(reader, t0) for reader, _ in conns))
    for _, writer in conns:
        writer.close()
    return [r[0] for r in results], [r[1] for r in results]


def stampede(port, origin_port, path, n):
    before = origin_calls(origin_port)
    times, statuses = asyncio.run(stampede_async(port, path, n))
    time.sleep(0.2)
    calls = origin_calls(origin_port) - before
    times_ms = sorted(t * 1e3 for t in times)
    first = times_ms[0]
    return {
        "origin_calls": calls,
        "first_ms": first,
        "p50_ms": statistics.median(times_ms),
        "p99_ms": times_ms[int(len(times_ms) * 0.99) - 1],
        "p50_after_first_ms": statistics.median(times_ms) - first,
        "ok": sum(s == 200 for s in statuses),
        "n": n,
    }


def miss_overhead(cache_port, origin_port, n):
    """Median latency of n misses through runcache minus n direct origin requests
    (interleaved, keep-alive, a distinct uncached run each time)."""
    direct = http.client.HTTPConnection("127.0.0.1", origin_port)
    cached = http.client.HTTPConnection("127.0.0.1", cache_port)
    d, c = [], []
    stamp = int(time.time() * 1000)
    for i in range(n):
        for conn, out, tag in ((direct, d, "d"), (cached, c, "c")):
            t0 = time.perf_counter()
            conn.request("GET", f"/api/v1/models/train/miss-{stamp}-{tag}{i}/metrics")
            resp = conn.getresponse()
            resp.read()
            out.append(time.perf_counter() - t0)
            if tag == "c" and resp.getheader("X-Cache") != "MISS":
                raise RuntimeError("miss-path request was not a MISS")
    d_ms, c_ms = statistics.median(d) * 1e3, statistics.median(c) * 1e3
    return {"origin_p50_ms": d_ms, "runcache_miss_p50_ms": c_ms, "overhead_p50_ms": c_ms - d_ms,
            "n": n}


def invalidation_cost(cache_port, run_id, comparisons, reps, ranking=None, datasets=0):
    """Median time of one training-completed event for a run with `comparisons` cached
    comparisons (re-warmed before every repetition). With `ranking`, the run is one of the
    runs that ranking lists (the sample origin's ranking `R` lists `R.1`..`R.5`): the ranking
    is warmed too, so the run's tag set holds comparisons and a ranking (a tag learned from an
    answer); with `datasets`, that many dataset stats are warmed beside them (tags of another
    kind, which the event must leave alone)."""
    times, dropped = [], []
    for rep in range(reps):
        bodies = [json.dumps({"model_run_ids": [run_id, f"{run_id}-peer-{i}"]})
                  for i in range(comparisons)]

        def compare(body):
            return http_call(cache_port, "POST", "/api/v1/models/compare", body,
                             {"Content-Type": "application/json"})[0]

        def get(path):
            return http_call(cache_port, "GET", path)[0]

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(compare, bodies))
            gets = ([f"/api/v1/models/rankings/{ranking}"] if ranking else []) + \
                [f"/api/v1/datasets/{run_id}-ds-{i}/stats" for i in range(datasets)]
            statuses += list(pool.map(get, gets))
        if any(s != 200 for s in statuses):
            raise RuntimeError(f"warming comparisons, ranking, datasets: {set(statuses)}")
        if ranking:
            _, headers, _, _ = http_call(cache_port, "GET", f"/api/v1/models/rankings/{ranking}")
            if {k.lower(): v for k, v in headers.items()}.get("x-cache") != "HIT":
                raise RuntimeError(f"ranking {ranking} was not cached: {headers}")
        status, _, body, secs = http_call(
            cache_port, "POST", "/events/training-completed",
            json.dumps({"model_run_id": run_id}), admin_headers())
        if status != 200:
            raise RuntimeError(f"event answered {status}: {body!r}")
        times.append(secs * 1e3)
        dropped.append(json.loads(body)["invalidated"])
    return {"ms_p50": statistics.median(times), "ms_all": times, "invalidated": dropped,
            "comparisons": comparisons, "ranking": ranking is not None, "datasets": datasets}


# The unrelated keys of the invalidation cell: entries of every view's kind, and tag sets of
# every tag kind (other runs', datasets', tuning jobs', rankings'), in the proportions below.
FILLER_ENTRIES = ("model:metrics", "dataset:stats", "tuning:results", "model:ranking",
                  "model:comparison")
FILLER_TAGS = ("run", "dataset", "tuning", "ranking")
# Fills ARGV[3] - ARGV[2] tag sets `{ARGV[1]}:filler-i` (i from ARGV[2]), one member each (an
# entry key of the filler); sets already there are left as they are, as DEBUG POPULATE does.
FILL_TAG_SETS = ("for i = tonumber(ARGV[2]), tonumber(ARGV[3]) - 1 do "
                 "redis.call('SADD', ARGV[1] .. ':filler-' .. i, ARGV[4] .. ':filler:' .. i) "
                 "end return redis.call('DBSIZE')")


def mixed_filler(redis_port, count):
    """Grows the unrelated keys to about `count` (on top of what is there): four fifths entries
    spread over FILLER_ENTRIES (DEBUG POPULATE, 64-byte values), one fifth tag sets spread over
    FILLER_TAGS. Idempotent per count: filling 10 k then 1 M gives 1 M, not 1.01 M."""
    entries = count * 4 // 5 // len(FILLER_ENTRIES)
    for kind in FILLER_ENTRIES:
        redis_cli(redis_port, "DEBUG", "POPULATE", entries, f"runcache:v1:{kind}:filler", 64)
    sets = count // 5 // len(FILLER_TAGS)
    for kind in FILLER_TAGS:
        for lo in range(0, sets, 50_000):
            redis_cli(redis_port, "EVAL", FILL_TAG_SETS, "0", f"runcache:_tags:v1:{kind}",
                      lo, min(sets, lo + 50_000), "runcache:v1:model:metrics")


def pattern_clear(cache_port, redis_port, keys):
    prefix = "runcache:v1:model:feature_importance:bulk"
    redis_cli(redis_port, "DEBUG", "POPULATE", keys, prefix, 64)
    sampler = subprocess.Popen(
        ["redis-cli", "-p", str(redis_port), "--latency", "-i", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.2)
    status, _, body, secs = http_call(
        cache_port, "DELETE", "/cache/clear?pattern=model:feature_importance:bulk:*",
        headers=admin_headers())
    time.sleep(1.2)
    sampler.terminate()
    out, _ = sampler.communicate(timeout=5)
    if status != 200:
        raise RuntimeError(f"clear answered {status}: {body!r}")
    deleted = json.loads(body)["deleted_count"]
    # Without a terminal, `redis-cli --latency` prints "min max avg samples" when stopped
    # (on a terminal it redraws "min: .., max: .., avg: .." instead).
    maxes = [int(m) for m in re.findall(r"max:\s*(\d+)", out)]
    maxes += [int(m.group(1)) for m in re.finditer(r"^\d+ (\d+) [\d.]+ \d+$", out, re.M)]
    return {"deleted": deleted, "seconds": secs, "keys_per_sec": deleted / secs,
            "redis_max_latency_ms": max(maxes) if maxes else None}


HOT_KEYS = 100
DEATH_SECS = 3


def hot_load(port, paths, threads=16):
    """Reads `paths` in turn on `threads` keep-alive connections until stopped; counts the
    requests and the failures (not 200, or no answer) of the phase named in `phase["name"]`."""
    phase = {"name": "settle"}
    tally = {}
    lock = threading.Lock()
    stop = threading.Event()

    def worker(w):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        i = w * 7
        while not stop.is_set():
            path = paths[i % len(paths)]
            i += 1
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            with lock:
                t = tally.setdefault(phase["name"], {"requests": 0, "failed": 0})
                t["requests"] += 1
                t["failed"] += not ok
        conn.close()

    workers = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(threads)]
    for t in workers:
        t.start()

    def finish():
        stop.set()
        for t in workers:
            t.join()
        return tally

    return phase, finish


def start_with_origin(binary, procs, name, redis_env):
    """A sample origin and a runcache of their own (default configuration, Redis settings
    `redis_env`), so that nothing else is counted; their ports `(runcache, origin)`."""
    origin_port, port = free_port(), free_port()
    exe = Path(binary).resolve()
    procs.start(f"{name}-origin", [str(exe), "sample-origin", "--addr",
                                   f"127.0.0.1:{origin_port}", "--delay-ms", str(ORIGIN_DELAY_MS)])
    wait_http(f"http://127.0.0.1:{origin_port}/health")
    env = {
        "RUNCACHE__SERVER__ADDR": f"127.0.0.1:{port}",
        "RUNCACHE__ORIGIN__BASE_URL": f"http://127.0.0.1:{origin_port}",
        "RUNCACHE__ADMIN__TOKEN": TOKEN,
        "RUNCACHE__JOURNAL__PATH": "",
        "RUNCACHE__AUTH__VALIDATION_TTL": "86400",
        "RUST_LOG": "warn",
        **redis_env,
    }
    # As for the other cells: a binary reads config/default.toml from its working directory.
    cwd = ROOT if exe == BIN.resolve() else exe.parents[2]
    procs.start(name, [str(exe)], env, cwd=cwd)
    wait_http(f"http://127.0.0.1:{port}/health")
    return port, origin_port


def only(args, measure, render):
    """Runs one measurement alone (no nginx, no wrk): `measure(binary, scratch, procs, name)`
    for this build and, with `--baseline`, for that one; prints `render` of both."""
    scratch = Path(tempfile.mkdtemp(prefix="runcache-bench-"))
    procs = Processes(scratch)
    try:
        res = {"runcache": measure(args.bin, scratch, procs, "this")}
        if args.baseline:
            res[args.baseline_label] = measure(args.baseline, scratch, procs, "baseline")
        log(f"  {res}")
        print(render(res))
    finally:
        procs.stop_all()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def redis_death(binary, scratch, procs, name):
    """Origin calls under load on HOT_KEYS hot keys: over DEATH_SECS with Redis up, then over
    the first DEATH_SECS after a SIGKILL of Redis, under the same load. A runcache of its own
    (default configuration) on a Redis and a sample origin of its own, so nothing else is
    counted."""
    redis_port = free_port()
    redis_dir = scratch / f"{name}-redis"
    redis_dir.mkdir()
    redis = procs.start(f"{name}-redis", ["redis-server", "--port", str(redis_port), "--bind",
                                          "127.0.0.1", "--save", "", "--appendonly", "no",
                                          "--dir", str(redis_dir)])
    deadline = time.time() + 10
    while subprocess.run(["redis-cli", "-p", str(redis_port), "PING"], capture_output=True,
                         text=True).stdout.strip() != "PONG":
        if time.time() > deadline:
            raise RuntimeError("the redis-server to kill did not start")
        time.sleep(0.05)
    port, origin_port = start_with_origin(binary, procs, name, {
        "RUNCACHE__REDIS__URL": f"redis://127.0.0.1:{redis_port}"})

    def stats():
        return json.loads(http_call(port, "GET", "/cache/stats", headers=admin_headers())[2])

    deadline = time.time() + 10
    while stats()["backend"] != "redis":
        if time.time() > deadline:
            raise RuntimeError("runcache did not start serving from redis")
        time.sleep(0.1)
    paths = [f"/api/v1/models/train/hot-{i}/metrics" for i in range(HOT_KEYS)]
    warm(port, paths, "x-cache", "HIT")
    phase, finish = hot_load(port, paths)
    time.sleep(1)
    phase["name"] = "up"
    before = origin_calls(origin_port)
    time.sleep(DEATH_SECS)
    up_calls = origin_calls(origin_port) - before
    phase["name"] = "killed"
    before = origin_calls(origin_port)
    redis.kill()
    redis.wait()
    time.sleep(DEATH_SECS)
    killed_calls = origin_calls(origin_port) - before
    phase["name"] = "done"
    tally = finish()
    after = stats()
    return {
        "hot_keys": HOT_KEYS, "seconds": DEATH_SECS,
        "up": {"origin_calls": up_calls, **tally.get("up", {})},
        "killed": {"origin_calls": killed_calls, **tally.get("killed", {})},
        "backend_after": after["backend"], "redis_reachable_after": after["redis_reachable"],
    }


def render_death(death):
    lines = ["", f"| Redis SIGKILLed under load on {HOT_KEYS} hot keys (16 connections, origin "
             f"{ORIGIN_DELAY_MS} ms) | origin calls, {DEATH_SECS} s with Redis up | origin calls, "
             f"first {DEATH_SECS} s after the kill | per hot key | requests after the kill "
             "(failed) |", "|---|---:|---:|---:|---:|"]
    for name, r in death.items():
        up, killed = r["up"], r["killed"]
        lines.append(f"| {name} | {up['origin_calls']} | {killed['origin_calls']} | "
                     f"{killed['origin_calls'] / r['hot_keys']:.2f} | "
                     f"{killed.get('requests', 0):,} ({killed.get('failed', 0)}) |")
    return "\n".join(lines) + "\n"


def redis_death_only(args):
    """`--redis-death-only`: the Redis death measurement alone."""
    return only(args, redis_death, render_death)


FAILOVER_SECS = 10


def failover_under_load(binary, procs, name, redis_env, fail_over, shards):
    """Origin calls under load on HOT_KEYS hot keys: over FAILOVER_SECS of steady state, then
    over the FAILOVER_SECS from when `fail_over()` starts, with a runcache of its own (its
    Redis settings `redis_env`) and a sample origin of its own, so nothing else is counted."""
    port, origin_port = start_with_origin(binary, procs, name, redis_env)
    paths = [f"/api/v1/models/train/hot-{i}/metrics" for i in range(HOT_KEYS)]
    warm(port, paths, "x-cache", "HIT")
    phase, finish = hot_load(port, paths)
    time.sleep(1)
    phase["name"] = "steady"
    before = origin_calls(origin_port)
    time.sleep(FAILOVER_SECS)
    steady = origin_calls(origin_port) - before
    phase["name"] = "failover"
    before = origin_calls(origin_port)
    started = time.time()
    fail_over()
    time.sleep(max(0.0, FAILOVER_SECS - (time.time() - started)))
    failover = origin_calls(origin_port) - before
    phase["name"] = "done"
    tally = finish()
    return {
        "hot_keys": HOT_KEYS, "seconds": FAILOVER_SECS, "shards": shards,
        "steady": {"origin_calls": steady, **tally.get("steady", {})},
        "failover": {"origin_calls": failover, **tally.get("failover", {})},
    }


def planned_failover(binary, scratch, procs, name):
    """[`failover_under_load`] on a private cluster of three primaries with a replica each:
    a `CLUSTER FAILOVER` of every shard, one after the other."""
    ports = start_cluster(scratch, nodes=6, replicas=1)

    def fail_over():
        replicas = [p for p in ports if "role:slave" in redis_cli(p, "INFO", "replication")]
        for replica in replicas:
            redis_cli(replica, "CLUSTER", "FAILOVER")
            deadline = time.time() + 10
            while "role:master" not in redis_cli(replica, "INFO", "replication"):
                if time.time() > deadline:
                    raise RuntimeError(f"{replica} was not promoted")
                time.sleep(0.05)

    try:
        return failover_under_load(binary, procs, name, {
            "RUNCACHE__REDIS__MODE": "cluster",
            "RUNCACHE__REDIS__CLUSTER_URLS": ",".join(f"redis://127.0.0.1:{p}" for p in ports),
        }, fail_over, 3)
    finally:
        for p in ports:
            subprocess.run(["redis-cli", "-p", str(p), "shutdown", "nosave"],
                           capture_output=True)


def start_sentinels(scratch):
    """A private master, its replica and three sentinels on loopback; (master, replica,
    sentinel ports)."""
    master, replica = free_port(), free_port()
    for port, extra in [(master, []), (replica, ["--replicaof", "127.0.0.1", str(master)])]:
        d = scratch / f"sentinel-data-{port}"
        d.mkdir()
        subprocess.run(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--daemonize", "yes", "--dir", str(d),
                        "--logfile", str(d / "redis.log"), *extra], check=True)
    sentinels = [free_port() for _ in range(3)]
    for port in sentinels:
        d = scratch / f"sentinel-{port}"
        d.mkdir()
        conf = d / "sentinel.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {d}\n"
                        f"sentinel monitor bench 127.0.0.1 {master} 2\n"
                        "sentinel down-after-milliseconds bench 1000\n"
                        "sentinel failover-timeout bench 5000\n")
        subprocess.run(["redis-server", str(conf), "--sentinel", "--daemonize", "yes",
                        "--logfile", str(d / "sentinel.log")], check=True)
    def others(port):
        lines = redis_cli(port, "SENTINEL", "MASTER", "bench").split("\n")
        for k, v in zip(lines, lines[1:]):
            if k.strip() == "num-other-sentinels":
                return v.strip()
        return ""

    deadline = time.time() + 30
    while "master_link_status:up" not in redis_cli(replica, "INFO", "replication") or \
            any(others(p) != "2" for p in sentinels):
        if time.time() > deadline:
            raise RuntimeError("the sentinels did not settle")
        time.sleep(0.2)
    return master, replica, sentinels


def planned_sentinel_failover(binary, scratch, procs, name):
    """[`failover_under_load`] with a master, a replica and three sentinels: one
    `SENTINEL FAILOVER`."""
    master, replica, sentinels = start_sentinels(scratch)
    try:
        return failover_under_load(binary, procs, name, {
            "RUNCACHE__REDIS__MODE": "sentinel",
            "RUNCACHE__REDIS__SENTINEL_URLS": ",".join(f"redis://127.0.0.1:{p}"
                                                       for p in sentinels),
            "RUNCACHE__REDIS__MASTER_NAME": "bench",
            "RUNCACHE__REDIS__URL": "redis://127.0.0.1:1",
        }, lambda: redis_cli(sentinels[0], "SENTINEL", "FAILOVER", "bench"), 1)
    finally:
        for p in [master, replica, *sentinels]:
            subprocess.run(["redis-cli", "-p", str(p), "shutdown", "nosave"],
                           capture_output=True)


def render_failover(res):
    lines = ["", f"| Planned failover (`CLUSTER FAILOVER` of every shard; `SENTINEL FAILOVER`) "
             f"under load on {HOT_KEYS} hot keys "
             f"(16 connections, origin {ORIGIN_DELAY_MS} ms) | origin calls, {FAILOVER_SECS} s "
             f"steady | origin calls, {FAILOVER_SECS} s from the first failover | per hot key | "
             "requests during the failovers (failed) |", "|---|---:|---:|---:|---:|"]
    for name, r in res.items():
        steady, f = r["steady"], r["failover"]
        shards = f"{r['shards']} shard" + ("s" if r["shards"] > 1 else "")
        lines.append(f"| {name} ({shards}) | {steady['origin_calls']} | "
                     f"{f['origin_calls']} | {f['origin_calls'] / r['hot_keys']:.2f} | "
                     f"{f.get('requests', 0):,} ({f.get('failed', 0)}) |")
    return "\n".join(lines) + "\n"


def failover_only(args):
    """`--failover-only`: the planned failovers alone, cluster then sentinel."""
    def both(binary, scratch, procs, name):
        return {"cluster": planned_failover(binary, scratch, procs, f"{name}-cluster"),
                "sentinel": planned_sentinel_failover(binary, scratch, procs,
                                                      f"{name}-sentinel")}
    return only(args, both, lambda res: render_failover(
        {f"{build}, {mode}": r for build, modes in res.items() for mode, r in modes.items()}))


STREAM_EVENTS = 10_000

# Queues ARGV[1] training-completed events for distinct runs in one step (a training sweep
# reaching the stream while no runcache reads it). One key, so `redis-cli -c` sends it to the
# stream's node in a cluster.
QUEUE_EVENTS = ("for i = 1, tonumber(ARGV[1]) do redis.call('XADD', KEYS[1], '*', 'kind', "
                "'training-completed', 'model_run_id', 'sweep-' .. i) end "
                "return redis.call('XINFO', 'STREAM', KEYS[1])")


def cli(port, cluster, *args):
    """redis-cli against one Redis, or a cluster node following redirections (-c)."""
    return redis_cli(port, *(["-c"] if cluster else []), *args)


def xinfo_field(text, name):
    """A field of a flat `redis-cli` reply (`XINFO STREAM`, `XINFO GROUPS` with one group):
    the line after the line that names it, or None."""
    lines = text.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line == name:
            return lines[i + 1]
    return None


def drained(groups, last_id):
    """Whether an `XINFO GROUPS` reply says the group delivered everything up to `last_id`
    and nothing is pending (every entry applied and acknowledged)."""
    return (xinfo_field(groups, "last-delivered-id") == last_id
            and xinfo_field(groups, "pending") == "0")


class Resp:
    """One connection speaking RESP2, for polling without starting a redis-cli each time
    (which would take longer than the thing measured). Follows a cluster's `MOVED`."""

    def __init__(self, port):
        self.connect(port)

    def connect(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def close(self):
        self.file.close()
        self.sock.close()

    def call(self, *args):
        for _ in range(3):
            parts = [f"*{len(args)}\r\n".encode()]
            for a in args:
                b = str(a).encode()
                parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
            self.sock.sendall(b"".join(parts))
            reply = self.read()
            if isinstance(reply, RuntimeError) and str(reply).startswith("MOVED "):
                self.close()
                self.connect(int(str(reply).split()[2].rsplit(":", 1)[1]))
                continue
            if isinstance(reply, RuntimeError):
                raise reply
            return reply
        raise RuntimeError(f"{args[0]}: too many redirections")

    def read(self):
        line = self.file.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:].decode()
        if kind == b"+":
            return rest
        if kind == b"-":
            return RuntimeError(rest)
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2].decode()
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise RuntimeError(f"unexpected reply {line!r}")


def flat(reply):
    """A nested reply as the lines `redis-cli` prints for it."""
    if isinstance(reply, list):
        return "\n".join(flat(r) for r in reply)
    return str(reply)


def stream_drain(port, cluster, start, events=STREAM_EVENTS, timeout=900):
    """Queues `events` events on a new stream (its group created first, at its start, so
    nothing is read yet), then starts a runcache reading it (`start(stream)`) and times from
    its first delivery until the group has delivered the last entry and none is pending."""
    stream = f"bench-events-{time.time_ns()}"
    cli(port, cluster, "XGROUP", "CREATE", stream, "runcache", "0", "MKSTREAM")
    info = cli(port, cluster, "EVAL", QUEUE_EVENTS, "1", stream, events)
    last_id = xinfo_field(info, "last-generated-id")
    if xinfo_field(info, "length") != str(events) or last_id is None:
        raise RuntimeError(f"queueing {events} events: {info!r}")
    conn = Resp(port)
    try:
        started = time.perf_counter()
        start(stream)
        t0 = None
        deadline = time.time() + timeout
        while True:
            groups = flat(conn.call("XINFO", "GROUPS", stream))
            now = time.perf_counter()
            if t0 is None and xinfo_field(groups, "last-delivered-id") not in (None, "0-0"):
                t0 = now
            if drained(groups, last_id):
                break
            if time.time() > deadline:
                raise RuntimeError(f"{stream}: not drained within {timeout} s: {groups!r}")
            time.sleep(0.001)
    finally:
        conn.close()
    seconds = now - t0
    return {"events": events, "seconds": seconds, "events_per_sec": events / seconds,
            "from_process_start_s": now - started}


def self_test():
    """Checks the reply parsing on captured `redis-cli` output (no server needed)."""
    groups = "\n".join(["name", "runcache", "consumers", "1", "pending", "0",
                        "last-delivered-id", "1796522714411-99", "entries-read", "10000",
                        "lag", "0"])
    assert xinfo_field(groups, "pending") == "0"
    assert drained(groups, "1796522714411-99")
    assert not drained(groups, "1796522714411-100")
    assert not drained(groups.replace("pending\n0", "pending\n3"), "1796522714411-99")
    stream = "\n".join(["length", "10000", "radix-tree-keys", "1", "last-generated-id",
                        "1796522714411-99", "first-entry", "1796522714411-0", "kind"])
    assert xinfo_field(stream, "length") == "10000"
    assert xinfo_field(stream, "last-generated-id") == "1796522714411-99"
    assert xinfo_field(stream, "nothing") is None
    nested = ["name", "runcache", "pending", 0, "last-delivered-id", "5-0"]
    assert drained(flat(nested), "5-0")
    row = render_drain({"single": {"events": 10000, "seconds": 2.5, "events_per_sec": 4000.0,
                                   "from_process_start_s": 2.9}})
    assert "10,000 queued stream events, one Redis | 2.50 s (4,000 events/s; 2.90 s from the " \
        "process start) |" in row[0], row
    inv = {"unrelated_small": 10_000, "unrelated_big": 1_000_000}
    for size, ms in (("small", 2.0), ("big", 2.4)):
        inv[size] = {"ms_p50": ms, "invalidated": [101, 101, 101], "comparisons": 100,
                     "ranking": True, "datasets": 20,
                     "comparisons_only": {"ms_p50": ms - 0.5, "invalidated": [100]},
                     "baseline": {"ms_p50": 1.5, "invalidated": [100]}}
    rows = invalidation_rows(inv)
    assert rows[0] == ("| invalidation, 100 comparisons + 1 ranking listing the run, 20 dataset "
                       "stats beside, 10,000 unrelated keys, mixed kinds | 2.00 ms (101 entries)"
                       " | | |"), rows
    assert rows[-1].startswith("| invalidation ratio big / small, 100 comparisons only | 1.27 |")
    rows = baseline_rows({"baseline": {"overhead_p50_ms": 0.4}}, inv)
    assert "1,000,000 unrelated keys: now / baseline | 1.90 / 1.50 ms (1.27)" in rows[2], rows
    print("bench.py self-test: ok")
    return 0


def render_drain(drain):
    """Table rows for the stream drain figures."""
    names = {"single": "one Redis", "cluster": "Redis Cluster, 3 primaries",
             "baseline": "one Redis, baseline commit"}
    return [f"| {r['events']:,} queued stream events, {names[k]} | {r['seconds']:.2f} s "
            f"({r['events_per_sec']:,.0f} events/s; {r['from_process_start_s']:.2f} s from the "
            f"process start) | | |" for k, r in drain.items()]


def baseline_rows(miss, inv):
    """The miss path and the invalidation against the earlier commit, when it was measured."""
    if "baseline" not in miss:
        return []
    b = miss["baseline"]
    rows = [f"| miss-path overhead p50, baseline commit | {b['overhead_p50_ms']:.2f} ms | | |"]
    for size in ("small", "big"):
        # The baseline is measured with comparisons only (no ranking or dataset route there):
        # compared with this build's comparisons-only cell when there is one.
        now = inv[size].get("comparisons_only", inv[size])["ms_p50"]
        base = inv[size]["baseline"]["ms_p50"]
        rows.append(f"| invalidation, 100 comparisons only (the baseline has no ranking or "
                    f"dataset route), {inv['unrelated_' + size]:,} unrelated keys: now / "
                    f"baseline | {now:.2f} / {base:.2f} ms ({now / base:.2f}) | | |")
    return rows


def invalidation_rows(inv):
    """The invalidation cost rows: the run's tag set and the unrelated keys, per size."""
    rows = []
    for size in ("small", "big"):
        r = inv[size]
        what = f"{r.get('comparisons', 100)} comparisons"
        if r.get("ranking"):
            what += f" + 1 ranking listing the run, {r.get('datasets', 0)} dataset stats beside"
        mixed = ", mixed kinds" if "comparisons_only" in r else ""
        dropped = statistics.median(r["invalidated"])
        rows.append(f"| invalidation, {what}, {inv['unrelated_' + size]:,} unrelated keys"
                    f"{mixed} | {r['ms_p50']:.2f} ms ({dropped:g} entries) | | |")
        if "comparisons_only" in r:
            rows.append(f"| invalidation, 100 comparisons only, {inv['unrelated_' + size]:,} "
                        f"unrelated keys{mixed} | {r['comparisons_only']['ms_p50']:.2f} ms | | |")
    if "comparisons_only" in inv["small"]:
        small, big = inv["small"]["comparisons_only"], inv["big"]["comparisons_only"]
        ratio = big["ms_p50"] / small["ms_p50"]
        rows.append(f"| invalidation ratio big / small, 100 comparisons only | {ratio:.2f} | "
                    f"≤ 1.5 | {'met' if ratio <= 1.5 else '**not met**'} |")
    return rows


def median_of(rounds, key):
    return statistics.median(r[key] for r in rounds)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one short round of everything")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--urls", type=int, default=1000)
    ap.add_argument("--baseline", help="another runcache binary (an earlier commit) measured "
                    "beside this one, default configuration, in the same rounds")
    ap.add_argument("--baseline-label", default="baseline")
    ap.add_argument("--redis-death-only", action="store_true",
                    help="only the origin calls a Redis SIGKILL under load costs")
    ap.add_argument("--failover-only", action="store_true",
                    help="only the origin calls a planned CLUSTER FAILOVER under load costs")
    ap.add_argument("--only-stream", action="store_true",
                    help="only the stream drain (10,000 queued events, one Redis and a cluster)")
    ap.add_argument("--events", type=int, default=STREAM_EVENTS,
                    help="events queued for the stream drain")
    ap.add_argument("--bin", "--runcache-bin", dest="bin", default=str(BIN),
                    help="the runcache binary (a debug one only to try the script out)")
    ap.add_argument("--self-test", action="store_true",
                    help="check the reply parsing and exit (no server)")
    args = ap.parse_args()
    if args.self_test:
        return self_test()
    if args.redis_death_only:
        return redis_death_only(args)
    if args.failover_only:
        return failover_only(args)
    if args.smoke:
        args.rounds, args.seconds, args.urls = 1, 1, 100
    big, small = (20_000, 10_000) if args.smoke else (1_000_000, 10_000)
    clear_keys = 10_000 if args.smoke else 100_000
    inv_reps = 1 if args.smoke else 5

    scratch = Path(tempfile.mkdtemp(prefix="runcache-bench-"))
    procs = Processes(scratch)
    redis_port = free_port()
    cluster_ports = []
    try:
        subprocess.run(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "no", "--daemonize", "yes",
                        "--enable-debug-command", "local", "--dir", str(scratch),
                        "--logfile", str(scratch / "redis.log")], check=True)
        cluster_ports = start_cluster(scratch)
        return run(args, scratch, procs, redis_port, big, small, clear_keys, inv_reps,
                   cluster_ports)
    finally:
        procs.stop_all()
        for port in [redis_port, *cluster_ports]:
            subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"],
                           capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


def free_cluster_port():
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port < 55000:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    pass


def start_cluster(scratch, nodes=3, replicas=0):
    """A private Redis Cluster on loopback: `nodes` nodes, `replicas` replicas per primary (the
    cluster-mode cell: three primaries)."""
    ports = [free_cluster_port() for _ in range(nodes)]
    for port in ports:
        d = scratch / f"cluster-{port}"
        d.mkdir()
        subprocess.run(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                        "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--save", "", "--appendonly", "no", "--daemonize", "yes",
                        "--dir", str(d), "--logfile", str(d / "redis.log")], check=True)
    for port in ports:
        deadline = time.time() + 10
        while redis_cli(port, "PING") != "PONG":
            if time.time() > deadline:
                raise RuntimeError(f"cluster node {port} did not start")
            time.sleep(0.05)
    subprocess.run(["redis-cli", "--cluster", "create",
                    *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", str(replicas),
                    "--cluster-yes"],
                   check=True, capture_output=True)
    deadline = time.time() + 30
    while not all("cluster_state:ok" in redis_cli(p, "CLUSTER", "INFO") for p in ports) or \
            any("master_link_status:down" in redis_cli(p, "INFO", "replication") for p in ports):
        if time.time() > deadline:
            raise RuntimeError("the cluster did not settle")
        time.sleep(0.1)
    return ports


def run(args, scratch, procs, redis_port, big, small, clear_keys, inv_reps, cluster_ports):
    ports = {name: free_port() for name in
             ("origin", "origin_fast", "default", "redis_only", "memory", "miss", "nginx",
              "nginx_stock", "ceiling", "ceiling_get", "dead_redis", "full_path", "baseline",
              "baseline_redis_only", "baseline_memory", "baseline_miss", "cluster_only",
              "drain", "drain_cluster", "drain_baseline")}
    binary = Path(args.bin)
    procs.start("origin", [str(binary), "sample-origin", "--addr",
                           f"127.0.0.1:{ports['origin']}", "--delay-ms", str(ORIGIN_DELAY_MS)])
    procs.start("origin_fast", [str(binary), "sample-origin", "--addr",
                                f"127.0.0.1:{ports['origin_fast']}", "--delay-ms", "0"])
    wait_http(f"http://127.0.0.1:{ports['origin']}/health")
    wait_http(f"http://127.0.0.1:{ports['origin_fast']}/health")

    def runcache(name, origin, redis_url, extra=None, binary=binary):
        env = {
            "RUNCACHE__SERVER__ADDR": f"127.0.0.1:{ports[name]}",
            "RUNCACHE__ORIGIN__BASE_URL": f"http://127.0.0.1:{ports[origin]}",
            "RUNCACHE__REDIS__URL": redis_url,
            "RUNCACHE__ADMIN__TOKEN": TOKEN,
            "RUNCACHE__JOURNAL__PATH": "",
            # auth.frontend = forward (the default) trusts the origin's acceptance of a caller
            # for an entry for auth.validation_ttl (60 s), then asks the origin again: one
            # origin round trip per entry and caller per minute, by design. The hit cells
            # measure hits, so that window is widened here; nothing else changes.
            "RUNCACHE__AUTH__VALIDATION_TTL": "86400",
            # The access line per request is logging, not caching; nginx runs without its
            # access log too.
            "RUST_LOG": "warn",
        }
        env.update(extra or {})
        # A binary reads config/default.toml from its working directory: the baseline's is
        # beside it (bench/run.sh copies it there), with the settings that binary knows.
        # (A relative program path would be looked up from that directory: resolve it first.)
        exe = Path(binary).resolve()
        cwd = ROOT if binary == Path(args.bin) else exe.parents[2]
        p = procs.start(name, [str(exe)], env, cwd=cwd)
        wait_http(f"http://127.0.0.1:{ports[name]}/health")
        return p

    redis_url = f"redis://127.0.0.1:{redis_port}"
    cluster_env = {"RUNCACHE__REDIS__MODE": "cluster",
                   "RUNCACHE__REDIS__CLUSTER_URLS": ",".join(
                       f"redis://127.0.0.1:{p}" for p in cluster_ports)}

    def drains():
        """The stream drain, each on a runcache of its own (default configuration)."""
        out = {}
        runs = [("single", "drain", redis_port, False, {}, binary),
                ("cluster", "drain_cluster", cluster_ports[0], True, cluster_env, binary)]
        if args.baseline:
            runs.append(("baseline", "drain_baseline", redis_port, False, {},
                         Path(args.baseline)))
        for key, name, port, cluster, extra, exe in runs:
            log(f"stream drain: {args.events} queued events, {key}")

            def start(stream, name=name, extra=extra, exe=exe):
                env = {"RUNCACHE__EVENTS__STREAM": stream, "RUNCACHE__CACHE__PREFIX": name}
                env.update(extra)
                servers[name] = runcache(name, "origin", redis_url, env, binary=exe)

            out[key] = stream_drain(port, cluster, start, args.events)
            log(f"  {out[key]}")
        return out

    servers = {}
    if args.only_stream:
        drain = drains()
        report = "\n".join(["| stream drain | value | target | |", "|---|---:|---|---|",
                            *render_drain(drain)]) + "\n"
        print(report)
        return 0
    servers.update({
        "default": runcache("default", "origin", redis_url),
        "redis_only": runcache("redis_only", "origin", redis_url,
                               {"RUNCACHE__L1__ENABLED": "false"}),
        "memory": runcache("memory", "origin", f"redis://127.0.0.1:{ports['dead_redis']}"),
        "miss": runcache("miss", "origin_fast", redis_url, {"RUNCACHE__CACHE__PREFIX": "miss"}),
        # The near cache without the hit lane: with CORS configured the lane stays closed
        # and every hit takes the full path (routing, extractors, the tower stack).
        "full_path": runcache("full_path", "origin", redis_url,
                              {"RUNCACHE__CORS__ALLOWED_ORIGINS": "https://app.example"}),
        # The Redis-only cell again, on a 3-primary Redis Cluster (redis.mode = cluster).
        "cluster_only": runcache("cluster_only", "origin", redis_url, {
            "RUNCACHE__L1__ENABLED": "false",
            "RUNCACHE__REDIS__MODE": "cluster",
            "RUNCACHE__REDIS__CLUSTER_URLS": ",".join(
                f"redis://127.0.0.1:{p}" for p in cluster_ports)}),
    })
    if args.baseline:
        # The same three modes and the miss path, from the earlier commit's binary.
        base = Path(args.baseline)
        servers["baseline"] = runcache("baseline", "origin", redis_url,
                                       {"RUNCACHE__CACHE__PREFIX": "baseline"}, binary=base)
        servers["baseline_redis_only"] = runcache(
            "baseline_redis_only", "origin", redis_url,
            {"RUNCACHE__CACHE__PREFIX": "baseline", "RUNCACHE__L1__ENABLED": "false"},
            binary=base)
        servers["baseline_memory"] = runcache(
            "baseline_memory", "origin", f"redis://127.0.0.1:{ports['dead_redis']}",
            binary=base)
        servers["baseline_miss"] = runcache("baseline_miss", "origin_fast", redis_url,
                                            {"RUNCACHE__CACHE__PREFIX": "baseline-miss"},
                                            binary=base)

    def nginx(name, tuning):
        nginx_dir = scratch / name
        nginx_dir.mkdir()
        conf = (ROOT / "bench/nginx.conf").read_text()
        conf = conf.replace("@DIR@", str(nginx_dir)).replace("@PORT@", str(ports[name]))
        conf = conf.replace("@ORIGIN@", f"127.0.0.1:{ports['origin']}").replace("@TUNING@", tuning)
        if os.geteuid() == 0:
            conf = "user root;\n" + conf
        (nginx_dir / "nginx.conf").write_text(conf)
        servers[name] = procs.start(name, ["nginx", "-p", str(nginx_dir), "-c",
                                           str(nginx_dir / "nginx.conf")])
        wait_http(f"http://127.0.0.1:{ports[name]}/api/v1/models/train/probe/metrics")

    nginx("nginx", "access_log off;\n    open_file_cache max=10000 inactive=60s;")
    nginx("nginx_stock", f"access_log {scratch}/nginx_stock/access.log;")

    paths = [f"/api/v1/models/train/run-{i}/feature-importance?top_n=30"
             for i in range(args.urls)]
    _, _, sample, _ = http_call(ports["origin"], "GET", paths[0])
    body_size = len(sample)
    servers["ceiling"] = procs.start("ceiling", [str(CEILING), f"127.0.0.1:{ports['ceiling']}",
                                                 str(body_size)])
    wait_http(f"http://127.0.0.1:{ports['ceiling']}/")
    # The Redis tier's own ceiling: the same handler making one GET on a multiplexed
    # connection to the same Redis.
    servers["ceiling_get"] = procs.start("ceiling_get", [
        str(CEILING), f"127.0.0.1:{ports['ceiling_get']}", str(body_size), redis_url])
    wait_http(f"http://127.0.0.1:{ports['ceiling_get']}/")
    paths_file = scratch / "paths.txt"
    paths_file.write_text("\n".join(paths) + "\n")

    targets = {
        "runcache (default: Redis + L1)": ("default", "x-cache", "HIT"),
        "runcache (Redis only, L1 off)": ("redis_only", "x-cache", "HIT"),
        "runcache (memory tier, no Redis)": ("memory", "x-cache", "HIT"),
        "nginx proxy_cache": ("nginx", "x-cache-status", "HIT"),
        "nginx proxy_cache, stock (access log on)": ("nginx_stock", "x-cache-status", "HIT"),
        "bare axum (ceiling)": ("ceiling", "content-type", "application/json"),
        "runcache (Redis + L1, full path: no hit lane)": ("full_path", "x-cache", "HIT"),
        "axum + one Redis GET (Redis ceiling)": ("ceiling_get", "content-type",
                                                 "application/json"),
    }
    if args.baseline:
        targets[f"runcache {args.baseline_label} (default: Redis + L1)"] = (
            "baseline", "x-cache", "HIT")
        targets[f"runcache {args.baseline_label} (Redis only, L1 off)"] = (
            "baseline_redis_only", "x-cache", "HIT")
        targets[f"runcache {args.baseline_label} (memory tier, no Redis)"] = (
            "baseline_memory", "x-cache", "HIT")
    targets[CLUSTER_CELL] = ("cluster_only", "x-cache", "HIT")
    checks = {}
    for label, (name, header, value) in targets.items():
        log(f"warming {len(paths)} URLs in {label}")
        checks[label] = warm(ports[name], paths, header, value)
        log(f"  sample after warm-up: {checks[label][0]}/{checks[label][1]} {header}: {value}")

    def pids_of(name):
        pid = servers[name].pid
        return [pid] + (child_pids(pid) if name.startswith("nginx") else [])

    hits = {label: {8: [], 64: []} for label in targets}
    # Each baseline cell runs right after the cell it is compared with, so that both see the
    # same spell of the shared machine.
    order = list(targets)
    baselines = order[8:11] if args.baseline else []
    for base, now in zip(baselines, order[:3]):
        order.remove(base)
        order.insert(order.index(now) + 1, base)
    for conns in (8, 64):
        for rnd in range(args.rounds):
            for label in order:
                name, header, value = targets[label]
                # With auth.frontend = forward (the default), the origin's acceptance of a
                # caller for an entry is trusted for auth.validation_ttl (60 s); past it, the
                # next request asks the origin again. Re-warming before each cell keeps every
                # cell a measure of hits.
                warm(ports[name], paths, header, value)
                r = run_wrk(ports[name], conns, args.seconds, paths_file, pids_of(name))
                hits[label][conns].append(r)
                log(f"c={conns} round {rnd + 1}: {label}: {r['rps']:.0f} rps, "
                    f"p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, "
                    f"{r['cpu_us_per_req']:.1f} µs CPU/req, non-2xx {r['non_2xx']}")

    log("stampede: 200 concurrent requests for one cold URL")
    stamp = int(time.time())
    stampedes = {
        "runcache": stampede(ports["default"], ports["origin"],
                             f"/api/v1/models/train/stampede-rc-{stamp}/metrics", 200),
        "nginx (proxy_cache_lock on)": stampede(
            ports["nginx"], ports["origin"],
            f"/api/v1/models/train/stampede-ng-{stamp}/metrics", 200),
    }
    log(f"  {stampedes}")

    log("miss-path overhead")
    miss = miss_overhead(ports["miss"], ports["origin_fast"], 50 if args.smoke else 300)
    log(f"  {miss}")
    if args.baseline:
        miss["baseline"] = miss_overhead(ports["baseline_miss"], ports["origin_fast"],
                                         50 if args.smoke else 300)
        log(f"  baseline: {miss['baseline']}")

    log(f"invalidation cost with {small} and {big} unrelated keys of mixed kinds")
    # This build: the run is listed by a ranking (a learned run: tag) beside its 100
    # comparisons, with dataset stats around ("mixed"); and the comparisons alone, as the
    # baseline is measured (a commit from before the view table has no ranking or dataset
    # route), for the now / baseline ratio.
    inv = {}
    for size, count in (("small", small), ("big", big)):
        mixed_filler(redis_port, count)
        inv[size] = invalidation_cost(ports["default"], f"inv-{size}.2", 100, inv_reps,
                                      ranking=f"inv-{size}", datasets=20)
        inv[size]["comparisons_only"] = invalidation_cost(ports["default"], f"inv-{size}-c",
                                                          100, inv_reps)
        if args.baseline:
            inv[size]["baseline"] = invalidation_cost(ports["baseline"], f"inv-{size}-b", 100,
                                                      inv_reps)
        inv[size]["dbsize"] = int(redis_cli(redis_port, "DBSIZE"))
        log(f"  {count}: mixed {inv[size]['ms_p50']:.2f} ms (invalidated "
            f"{inv[size]['invalidated']}), comparisons only "
            f"{inv[size]['comparisons_only']['ms_p50']:.2f} ms, dbsize {inv[size]['dbsize']}")
    inv_small, inv_big = inv["small"], inv["big"]

    log(f"pattern clear of {clear_keys} keys")
    # Our own private Redis: the filler goes first, so the clear walks its own keyspace.
    redis_cli(redis_port, "FLUSHALL")
    clear = pattern_clear(ports["default"], redis_port, clear_keys)
    log(f"  {clear}")

    log(f"origin calls under load on {HOT_KEYS} hot keys, Redis up then SIGKILLed")
    death = {"runcache": redis_death(BIN, scratch, procs, "death")}
    if args.baseline:
        death[args.baseline_label] = redis_death(args.baseline, scratch, procs, "death_baseline")
    log(f"  {death}")
    drain = drains()

    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "settings": {"rounds": args.rounds, "seconds": args.seconds, "urls": args.urls,
                     "body_bytes": body_size, "origin_delay_ms": ORIGIN_DELAY_MS,
                     "smoke": args.smoke},
        "warm_checks": checks,
        "hits": {label: {str(c): v for c, v in by.items()} for label, by in hits.items()},
        "stampede": stampedes,
        "miss_overhead": miss,
        "invalidation": {"unrelated_small": small, "unrelated_big": big,
                         "small": inv_small, "big": inv_big,
                         "ratio": inv_big["ms_p50"] / inv_small["ms_p50"]},
        "pattern_clear": clear,
        "redis_death": death,
        "stream_drain": drain,
    }
    report = render(results, list(targets))
    print(report)
    out_dir = ROOT / "bench/results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"{stamp}.md").write_text(report)
    (out_dir / f"{stamp}.json").write_text(json.dumps(results, indent=2))
    (out_dir / "latest.md").write_text(report)
    (out_dir / "latest.json").write_text(json.dumps(results, indent=2))
    log(f"written to bench/results/{stamp}.md and .json")
    return 0


CLUSTER_CELL = "runcache (Redis Cluster only, 3 primaries, L1 off)"


def render(res, labels):
    hits = res["hits"]
    s = res["settings"]
    lines = [f"# runcache benchmark, {res['date']}", "",
             f"{res['machine']['cpus']} CPUs shared by wrk and the servers; {s['urls']} URLs, "
             f"{s['body_bytes']}-byte JSON bodies; median of {s['rounds']} alternating rounds "
             f"of {s['seconds']} s per cell{' (smoke mode)' if s['smoke'] else ''}.", "",
             "| hits | rps @8 | p50 / p99 ms @8 | rps @64 | p50 / p99 ms @64 | CPU µs/req @64 |",
             "|---|---:|---:|---:|---:|---:|"]
    for label in labels:
        r8, r64 = hits[label]["8"], hits[label]["64"]
        lines.append(
            f"| {label} | {median_of(r8, 'rps'):,.0f} | {median_of(r8, 'p50_ms'):.3f} / "
            f"{median_of(r8, 'p99_ms'):.3f} | {median_of(r64, 'rps'):,.0f} | "
            f"{median_of(r64, 'p50_ms'):.3f} / {median_of(r64, 'p99_ms'):.3f} | "
            f"{median_of(r64, 'cpu_us_per_req'):.1f} |")
    default, redis_only = labels[0], labels[1]
    nginx, stock, ceiling = labels[3], labels[4], labels[5]

    def ratio(a, b, c):
        return median_of(hits[a][c], "rps") / median_of(hits[b][c], "rps")

    def p99_ok(c):
        return median_of(hits[default][c], "p99_ms") <= median_of(hits[nginx][c], "p99_ms")

    def mark(ok):
        return "met" if ok else "**not met**"

    cpu = median_of(hits[default]["64"], "cpu_us_per_req")
    # Today's goals (issue 23). The old "≥ 1.80 × nginx" rows are retired: tuned nginx itself
    # serves well under the bare ceiling here, so they measured nginx, not runcache.
    rows = [
        ("default / tuned nginx @8", ratio(default, nginx, "8"), "≥ 1.10"),
        ("default / tuned nginx @64", ratio(default, nginx, "64"), "≥ 1.10"),
        ("default / bare ceiling @8", ratio(default, ceiling, "8"), ""),
        ("default / bare ceiling @64", ratio(default, ceiling, "64"), "≥ 0.90"),
        ("Redis only / tuned nginx @64", ratio(redis_only, nginx, "64"), ""),
        ("tuned nginx / bare ceiling @64", ratio(nginx, ceiling, "64"), ""),
        ("default / stock nginx @8", ratio(default, stock, "8"), ""),
        ("default / stock nginx @64", ratio(default, stock, "64"), ""),
        ("Redis only / stock nginx @64", ratio(redis_only, stock, "64"), ""),
    ]
    lines += ["", "| ratio (same run) | value | target | |", "|---|---:|---|---|"]
    for name, value, target in rows:
        if not target:
            lines.append(f"| {name} | {value:.3f} | | |")
            continue
        ok = value <= float(target[2:]) if target.startswith("≤") else value >= float(target[2:])
        lines.append(f"| {name} | {value:.3f} | {target} | {mark(ok)} |")
    lines.append(f"| ceiling p99 @8 / @64 (the framework's own tail) | "
                 f"{median_of(hits[ceiling]['8'], 'p99_ms'):.3f} / "
                 f"{median_of(hits[ceiling]['64'], 'p99_ms'):.3f} ms | | |")
    lines.append(f"| default p99 ≤ nginx p99 @8 / @64 | "
                 f"{median_of(hits[default]['8'], 'p99_ms'):.3f} / "
                 f"{median_of(hits[default]['64'], 'p99_ms'):.3f} ms | ≤ nginx | "
                 f"{mark(p99_ok('8') and p99_ok('64'))} |")
    lines.append(f"| server CPU per hit (default @64) | {cpu:.1f} µs | ≤ 20 µs | {mark(cpu <= 20)} |")
    full_path = labels[6]
    lines.append(f"| hit lane: default / full path @8 / @64 | {ratio(default, full_path, '8'):.3f}"
                 f" / {ratio(default, full_path, '64'):.3f} | | |")
    def paired(a, b, c):
        # The median of the per-round ratios: both cells of a round ran within seconds of
        # each other, so a slow spell of the shared machine moves both.
        return statistics.median(x["rps"] / y["rps"] for x, y in zip(hits[a][c], hits[b][c]))

    memory, one_get = labels[2], labels[7]
    for c in ("8", "64"):
        value = paired(redis_only, one_get, c)
        lines.append(f"| Redis only / one-GET ceiling @{c} (median of per-round ratios) | "
                     f"{value:.3f} | ≥ 0.80 | {mark(value >= 0.80)} |")
    for c in ("8", "64"):
        value = paired(memory, ceiling, c)
        lines.append(f"| memory tier / bare ceiling @{c} (median of per-round ratios) | "
                     f"{value:.3f} | ≥ 0.85 | {mark(value >= 0.85)} |")
    lines.append(f"| CPU per request @64: Redis only / one-GET ceiling / memory tier / bare | "
                 f"{median_of(hits[redis_only]['64'], 'cpu_us_per_req'):.1f} / "
                 f"{median_of(hits[one_get]['64'], 'cpu_us_per_req'):.1f} / "
                 f"{median_of(hits[memory]['64'], 'cpu_us_per_req'):.1f} / "
                 f"{median_of(hits[ceiling]['64'], 'cpu_us_per_req'):.1f} µs | | |")

    if CLUSTER_CELL in labels:
        for c in ("8", "64"):
            value = paired(CLUSTER_CELL, one_get, c)
            lines.append(f"| Redis Cluster only / one-GET ceiling @{c} (median of per-round "
                         f"ratios; the ceiling's GET is to one node) | "
                         f"{value:.3f} | ≥ 0.70 | {mark(value >= 0.70)} |")
        lines.append(f"| CPU per request @64: Redis Cluster only / Redis only | "
                     f"{median_of(hits[CLUSTER_CELL]['64'], 'cpu_us_per_req'):.1f} / "
                     f"{median_of(hits[redis_only]['64'], 'cpu_us_per_req'):.1f} µs | | |")

    if any(label.startswith("runcache ") and label not in labels[:8] and label != CLUSTER_CELL
           for label in labels):
        # Each mode against the same mode of the earlier commit, in the same rounds.
        for mode, (now, base) in zip(("default", "Redis only", "memory tier"),
                                     ((default, labels[8]), (redis_only, labels[9]),
                                      (labels[2], labels[10]))):
            r8, r64 = paired(now, base, "8"), paired(now, base, "64")
            lines.append(f"| {mode} / {base} @8 / @64 (median of per-round ratios) | "
                         f"{r8:.3f} / {r64:.3f} | "
                         f"≥ 0.95 (no regression) | {mark(min(r8, r64) >= 0.95)} |")
            lines.append(f"| CPU per hit @64, {mode}: now vs baseline | "
                         f"{median_of(hits[now]['64'], 'cpu_us_per_req'):.1f} vs "
                         f"{median_of(hits[base]['64'], 'cpu_us_per_req'):.1f} µs | | |")

    st = res["stampede"]
    rc = st["runcache"]
    lines += ["", "| stampede: 200 concurrent requests, one cold URL "
              f"(origin {s['origin_delay_ms']} ms) | origin calls | first answer ms | "
              "p50 ms | p50 after first ms | p99 ms |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in st.items():
        lines.append(f"| {name} | {r['origin_calls']} | {r['first_ms']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p50_after_first_ms']:.1f} | {r['p99_ms']:.1f} |")
    m = res["miss_overhead"]
    inv = res["invalidation"]
    c = res["pattern_clear"]
    lines += ["", "| other measures | value | target | |", "|---|---:|---|---|",
              f"| stampede origin calls (runcache) | {rc['origin_calls']} | exactly 1 | "
              f"{mark(rc['origin_calls'] == 1)} |",
              f"| stampede waiters p50 after the first answer (runcache) | "
              f"{rc['p50_after_first_ms']:.1f} ms | ≤ 20 ms | "
              f"{mark(rc['p50_after_first_ms'] <= 20)} |",
              f"| miss-path overhead p50 (runcache miss {m['runcache_miss_p50_ms']:.2f} ms − "
              f"origin {m['origin_p50_ms']:.2f} ms) | {m['overhead_p50_ms']:.2f} ms | < 1 ms | "
              f"{mark(m['overhead_p50_ms'] < 1)} |",
              *invalidation_rows(inv),
              f"| invalidation ratio big / small | {inv['ratio']:.2f} | ≤ 1.5 | "
              f"{mark(inv['ratio'] <= 1.5)} |",
              *baseline_rows(m, inv),
              f"| pattern clear of {c['deleted']:,} keys | {c['keys_per_sec']:,.0f} keys/s "
              f"({c['seconds']:.2f} s) | | |",
              f"| Redis max latency during the clear (`redis-cli --latency`) | "
              f"{c['redis_max_latency_ms']} ms | < 10 ms | "
              f"{mark(c['redis_max_latency_ms'] is not None and c['redis_max_latency_ms'] < 10)} |",
              *render_drain(res.get("stream_drain", {}))]
    if "redis_death" in res:
        lines.append(render_death(res["redis_death"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
