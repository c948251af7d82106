#!/usr/bin/env python3
"""runcache in front of a real MLflow tracking server: the UI's hot reads, straight at MLflow
and through runcache hits, in one run, as ratios (bench/mlflow.sh builds and calls this).

Data set (as in ../shared/research/mlflow.md): one experiment of --runs runs (default 2,000),
each with 20 metrics x 5 steps, 5 params and 1 tag, plus one run with `loss` x 10,000 steps.
Reads, each under 8 and 64 connections (wrk, loopback):
  search   POST runs/search, the UI's 100-run page (about 420 KB)
  history  GET metrics/get-history, one metric of 10,000 steps (about 1.2 MB)
  run      GET runs/get
Then the CPU runcache spends per hit of the search page with `Accept-Encoding: gzip` against
the same hit without it (the gzip copy is made once per entry).
"""
import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def call(base, method, path, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()


def seed(base, runs):
    api = "/api/2.0/mlflow/"
    _, _, b = call(base, "POST", api + "experiments/create", {"name": f"bench-{int(time.time())}"})
    exp = json.loads(b)["experiment_id"]

    def one(i):
        _, _, b = call(base, "POST", api + "runs/create",
                       {"experiment_id": exp, "run_name": f"run-{i}", "start_time": 1_700_000_000_000 + i})
        rid = json.loads(b)["run"]["info"]["run_id"]
        metrics = [{"key": f"m{k}", "value": (i * 7 + k * 13 + s) % 100 / 100, "timestamp": 1_700_000_000_000, "step": s}
                   for k in range(20) for s in range(5)]
        params = [{"key": f"p{k}", "value": str(k * i)} for k in range(5)]
        call(base, "POST", api + "runs/log-batch",
             {"run_id": rid, "metrics": metrics, "params": params, "tags": [{"key": "t", "value": "x"}]})
        return rid

    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(one, range(runs)))
    _, _, b = call(base, "POST", api + "runs/create", {"experiment_id": exp, "run_name": "long"})
    long_run = json.loads(b)["run"]["info"]["run_id"]
    for chunk in range(0, 10_000, 1000):
        metrics = [{"key": "loss", "value": 1 / (s + 1), "timestamp": 1_700_000_000_000, "step": s}
                   for s in range(chunk, chunk + 1000)]
        call(base, "POST", api + "runs/log-batch", {"run_id": long_run, "metrics": metrics})
    log(f"seeded {runs} runs and one 10,000-step history in {time.time() - started:.0f} s")
    return exp, ids[0], long_run


LUA = """
wrk.method = "%s"
wrk.headers["Content-Type"] = "application/json"
%s
wrk.body = %s
"""


def run_wrk(url, method, body, conns, secs, pid=None, gzip=False):
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    extra = 'wrk.headers["Accept-Encoding"] = "gzip"' if gzip else ""
    # The body as a Lua string literal: the JSON text, quoted (JSON's escapes of an ASCII text
    # are Lua's). A JSON object written bare is no Lua: wrk would then send its default GET.
    script.write_text(LUA % (method, extra,
                             json.dumps(json.dumps(body)) if body is not None else "nil"))
    cpu0 = cpu_seconds(pid) if pid else 0
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{secs}s", "--timeout", "30s", "--latency",
                          "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    cpu = (cpu_seconds(pid) - cpu0) if pid else 0
    script.unlink()
    total = int(re.search(r"(\d+) requests in", out).group(1))
    # A cell of error answers measures nothing: stop rather than print it as a figure.
    if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) and int(m.group(1)) > 0:
        raise RuntimeError(f"{method} {url}: {m.group(1)} of {total} answers were not 2xx")
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": latency(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),
        "p99_ms": latency(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),
        "requests": total,
        "non_2xx": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0,
        "errors": m.group(1).strip() if (m := re.search(r"Socket errors: (.*)", out)) else "",
        "cpu_us_per_req": cpu / total * 1e6 if total and pid else None,
    }


def latency(text):
    n, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(direct, run_id):
    """Waits until MLflow answers a runs/get in under a second again (a load cell leaves
    requests queued in it)."""
    for _ in range(120):
        started = time.time()
        try:
            call(direct, "GET", f"/api/2.0/mlflow/runs/get?run_id={run_id}")
            if time.time() - started < 1:
                return
        except Exception:
            pass
        time.sleep(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target/release/runcache"))
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--direct-seconds", type=int, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="runcache-mlflow-bench-"))
    procs = []
    mlflow_pid = None
    try:
        mport, rport, cport = free_port(), free_port(), free_port()
        procs.append(subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
                                      stdout=subprocess.DEVNULL))
        env = dict(os.environ, MLFLOW_WORKERS=os.environ.get("MLFLOW_WORKERS", "4"))
        out = subprocess.run(["bash", str(ROOT / "tests/mlflow/start_mlflow.sh"), str(mport), str(work / "mlflow")],
                             capture_output=True, text=True, check=True, env=env).stdout
        mlflow_pid = int(out.strip().splitlines()[-1])
        direct = f"http://127.0.0.1:{mport}"
        exp, some_run, long_run = seed(direct, args.runs)
        rc_env = dict(os.environ, RUNCACHE_CONFIG="config/mlflow.toml",
                      RUNCACHE__SERVER__ADDR=f"127.0.0.1:{cport}",
                      RUNCACHE__ORIGIN__BASE_URL=direct,
                      RUNCACHE__REDIS__URL=f"redis://127.0.0.1:{rport}",
                      RUNCACHE__ADMIN__TOKEN="bench-admin-token-0123456789",
                      RUNCACHE__JOURNAL__PATH="", RUST_LOG="warn")
        rc = subprocess.Popen([args.bin], cwd=ROOT, env=rc_env, stdout=subprocess.DEVNULL)
        procs.append(rc)
        gateway = f"http://127.0.0.1:{cport}"
        for _ in range(200):
            try:
                if call(gateway, "GET", "/_runcache/ready")[0] == 200:
                    break
            except Exception:
                time.sleep(0.1)
        search = {"experiment_ids": [exp], "run_view_type": "ACTIVE_ONLY", "max_results": 100,
                  "order_by": ["attributes.start_time DESC"]}
        reads = {
            "search": ("POST", "/api/2.0/mlflow/runs/search", search),
            "history": ("GET", f"/api/2.0/mlflow/metrics/get-history?run_id={long_run}&metric_key=loss", None),
            "run": ("GET", f"/api/2.0/mlflow/runs/get?run_id={some_run}", None),
        }
        rows = []
        for name, (method, path, body) in reads.items():
            _, headers, data = call(gateway, method, path, body)
            _, headers, _ = call(gateway, method, path, body)
            status = headers.get("cache-status", "")
            assert "hit" in status, f"{name} is not a hit through runcache: {status}"
            for conns in (8, 64):
                g = run_wrk(gateway + path, method, body, conns, args.seconds, pid=rc.pid)
                d = run_wrk(direct + path, method, body, conns, args.direct_seconds)
                settle(direct, some_run)
                rows.append((name, len(data), conns, d, g))
                log(f"{name} @{conns}: direct {d['rps']:.1f}/s p50 {d['p50_ms']:.1f} ms "
                    f"(non-2xx {d['non_2xx']}, errors {d['errors'] or 0}), "
                    f"runcache {g['rps']:.0f}/s p50 {g['p50_ms']:.2f} ms (non-2xx {g['non_2xx']}, "
                    f"errors {g['errors'] or 0})")
        plain = run_wrk(gateway + reads["search"][1], "POST", search, 8, args.seconds, pid=rc.pid)
        gz = run_wrk(gateway + reads["search"][1], "POST", search, 8, args.seconds, pid=rc.pid, gzip=True)
        _, gz_headers, gz_body = call(gateway, "POST", reads["search"][1], search, {"Accept-Encoding": "gzip"})
        print("| read | body | conns | MLflow rps | MLflow p50 / p99 ms | runcache rps | runcache p50 / p99 ms | rps ratio | p50 ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, size, conns, d, g in rows:
            print(f"| {name} | {size / 1024:.0f} KB | {conns} | {d['rps']:.1f} | {d['p50_ms']:.1f} / {d['p99_ms']:.1f} | "
                  f"{g['rps']:.0f} | {g['p50_ms']:.2f} / {g['p99_ms']:.2f} | {g['rps'] / d['rps']:.0f}x | "
                  f"{d['p50_ms'] / g['p50_ms']:.0f}x |")
        print()
        print("| search page hit, 8 connections | rps | CPU per hit | bytes sent |")
        print("|---|---:|---:|---:|")
        print(f"| identity | {plain['rps']:.0f} | {plain['cpu_us_per_req']:.0f} µs | {len(call(gateway, 'POST', reads['search'][1], search)[2]) / 1024:.0f} KB |")
        print(f"| gzip (copy made once) | {gz['rps']:.0f} | {gz['cpu_us_per_req']:.0f} µs | {len(gz_body) / 1024:.0f} KB ({gz_headers.get('content-encoding')}) |")
        print(f"\nCPU per gzip hit / identity hit: {gz['cpu_us_per_req'] / plain['cpu_us_per_req']:.2f}")
    finally:
        for p in procs:
            p.terminate()
        if mlflow_pid:
            try:
                os.killpg(mlflow_pid, 15)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait()


if __name__ == "__main__":
    main()
