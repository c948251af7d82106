#!/usr/bin/env python3
"""Hits of large bodies (400 KB and 4 MB metric histories), with and without gzip, against
bare axum sending the same bytes (bench/run.sh runs it after the work per hit; standard
library only, plus wrk, redis-server and valgrind for --instructions).

The ceiling example (`CEILING_BODY=json`) is both the origin of the bodies and the bare
ceiling: it answers every GET with one metric history of the given size, and a request that
accepts gzip with a gzip copy it made once at start. runcache serves the same body from a
view `blob` declared in an overlay file (`cache.max_entry_bytes` raised to 8 MB), in three
tiers: the memory tier (no Redis), Redis only (near cache off), and the default (Redis and the
near cache). A gzip hit is served from runcache's own copy, made once per ETag
(`cache.compressed_max_bytes`).

Per cell: wrk requests per second and CPU per hit of the server process, in alternating
rounds, as ratios to the ceiling of the same size and encoding measured in the same round.
With --instructions, also instructions per hit under callgrind for the ceiling and each tier:
a hit that copied, hashed or compressed the body would cost instructions in proportion to
its size (a copy of 4 MB is about 130,000 instructions, a hash or a compression far more),
where the ceiling's cost does not grow with it (the kernel's copy is not counted).

    python3 bench/bodies.py                      # 3 rounds of 3 s per cell (~3 min once built)
    python3 bench/bodies.py --instructions       # also instructions per hit (~2 min more)
    python3 bench/bodies.py --sizes 400000 --rounds 1 --seconds 2
    python3 bench/bodies.py --rounds 0 --instructions   # instructions per hit only
"""

import argparse
import datetime
import http.client
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import instructions  # noqa: E402

ROOT = bench.ROOT
URLS = 10
OVERLAY = """
[cache]
max_entry_bytes = 8388608

[views.blob]
method = "GET"
path = "/blob/{id}"
key = "blob:{id}"
tags = ["blob:{id}"]
ttl = "LONG"
description = "A large body, for bench/bodies.py."
"""
# name -> (what, runcache settings)
TIERS = {
    "memory": ("runcache memory tier (no Redis)", {}),
    "redis_only": ("runcache Redis only (near cache off)", {"RUNCACHE__L1__ENABLED": "false"}),
    "default": ("runcache default (Redis + near cache)", {}),
}
ENCODINGS = {"identity": None, "gzip": "gzip"}
CEILINGS = {
    "ceiling": "bare axum, same bytes (ceiling)",
    "ceiling_get": "axum + one Redis GET of the bytes (Redis ceiling)",
}


def encodings(server):
    """The encodings `server` is measured in: the Redis ceiling sends the bytes as stored."""
    return {"identity": None} if server == "ceiling_get" else ENCODINGS


def human(size):
    return f"{size / 1_000_000:g} MB" if size >= 1_000_000 else f"{size / 1000:g} KB"


def check(port, path, encoding, runcache, conn=None):
    """The answer is a 200 (a hit, for runcache) in the encoding asked for; its body bytes.
    On `conn` (kept alive) if given, else on a connection of its own."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    # As wrk: no Accept-Encoding unless asked (http.client would send `identity`, and
    # runcache serves a request with that header on its full path, not its hit lane).
    conn.putrequest("GET", path, skip_accept_encoding=True)
    if encoding:
        conn.putheader("Accept-Encoding", encoding)
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    status = resp.status
    got = {k.lower(): v for k, v in resp.getheaders()}
    if own:
        conn.close()
    if status != 200:
        raise RuntimeError(f"port {port} {path}: status {status}")
    if runcache and not got.get("x-cache", "").startswith("HIT"):
        raise RuntimeError(f"port {port} {path}: X-Cache {got.get('x-cache')}, not a hit")
    if got.get("content-encoding") != encoding:
        raise RuntimeError(f"port {port} {path}: Content-Encoding {got.get('content-encoding')},"
                           f" asked for {encoding}")
    return len(body)


def runcache_env(name, port, origin_port, redis_url, overlay, extra):
    """The environment of a runcache serving the view `blob` from the ceiling at `origin_port`."""
    return {
        "RUNCACHE_CONFIG": str(overlay),
        "RUNCACHE__SERVER__ADDR": f"127.0.0.1:{port}",
        "RUNCACHE__ORIGIN__BASE_URL": f"http://127.0.0.1:{origin_port}",
        "RUNCACHE__REDIS__URL": redis_url,
        "RUNCACHE__ADMIN__TOKEN": bench.TOKEN,
        "RUNCACHE__JOURNAL__PATH": "",
        "RUNCACHE__CACHE__PREFIX": f"bodies-{name}",
        "RUNCACHE__AUTH__VALIDATION_TTL": "86400",
        "RUST_LOG": "warn",
        **extra,
    }


def wrk(port, conns, secs, paths_file, pid, encoding):
    extra = ["-H", f"Accept-Encoding: {encoding}"] if encoding else []
    cpu0 = bench.cpu_seconds([pid])
    out = subprocess.run(
        ["wrk", "-t2", f"-c{conns}", f"-d{secs}s", "--latency", *extra, "-s",
         str(ROOT / "bench/urls.lua"), f"http://127.0.0.1:{port}", "--", str(paths_file)],
        capture_output=True, text=True, check=True).stdout
    cpu = bench.cpu_seconds([pid]) - cpu0
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        raise RuntimeError(f"port {port}: {bad.group(1)} non-2xx answers")
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p99_ms": bench.parse_latency(re.search(r"^\s+99%\s+(\S+)", out, re.M)
                                      .group(1)),
        "cpu_us_per_req": cpu / total * 1e6 if total else float("nan"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=str(bench.BIN))
    ap.add_argument("--ceiling", default=str(bench.CEILING))
    ap.add_argument("--sizes", default="400000,4000000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--tiers", default=",".join(TIERS))
    ap.add_argument("--instructions", action="store_true",
                    help="also instructions per hit under callgrind")
    ap.add_argument("--hits", type=int, default=200, help="hits per callgrind cell")
    ap.add_argument("--keep", action="store_true",
                    help="keep the scratch directory (callgrind dumps, logs) and print it")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    tiers = [t for t in args.tiers.split(",") if t]
    scratch = Path(tempfile.mkdtemp(prefix="runcache-bodies-"))
    procs = bench.Processes(scratch)
    binary = Path(args.bin).resolve()
    ceiling = Path(args.ceiling).resolve()
    overlay = scratch / "bodies.toml"
    overlay.write_text(OVERLAY)
    paths = [f"/blob/b{i}" for i in range(URLS)]
    paths_file = scratch / "paths.txt"
    paths_file.write_text("\n".join(paths) + "\n")
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": subprocess.run(["git", "-C", str(ROOT), "describe", "--always",
                                         "--dirty"], capture_output=True, text=True)
               .stdout.strip(),
               "settings": {"rounds": args.rounds, "seconds": args.seconds,
                            "conns": args.conns, "urls": URLS},
               "sizes": {}}
    try:
        redis_port = bench.free_port()
        procs.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(scratch)])
        instructions.wait_redis(redis_port)
        redis_url = f"redis://127.0.0.1:{redis_port}"
        for size in sizes:
            ceiling_port = bench.free_port()
            cp = procs.start(f"ceiling-{size}", [str(ceiling), f"127.0.0.1:{ceiling_port}",
                                                 str(size)], {"CEILING_BODY": "json"})
            bench.wait_http(f"http://127.0.0.1:{ceiling_port}/")
            servers = {"ceiling": (CEILINGS["ceiling"], ceiling_port, cp)}
            get_port = bench.free_port()
            gp = procs.start(f"ceiling-get-{size}", [str(ceiling), f"127.0.0.1:{get_port}",
                                                     str(size), redis_url],
                             {"CEILING_BODY": "json"})
            bench.wait_http(f"http://127.0.0.1:{get_port}/")
            servers["ceiling_get"] = (CEILINGS["ceiling_get"], get_port, gp)
            for name in tiers:
                what, extra = TIERS[name]
                port = bench.free_port()
                url = f"redis://127.0.0.1:{bench.free_port()}" if name == "memory" else redis_url
                env = runcache_env(name, port, ceiling_port, url, overlay,
                                     {**extra, "RUNCACHE__CACHE__PREFIX": f"b{size}-{name}"})
                p = procs.start(f"{name}-{size}", [str(binary)], env, cwd=ROOT)
                bench.wait_http(f"http://127.0.0.1:{port}/health")
                servers[name] = (what, port, p)
            sent = {}
            for name, (what, port, _) in servers.items():
                for path in paths:
                    for enc in encodings(name).values():
                        # The first gzip request of a hit makes runcache's copy.
                        for _ in range(3):
                            try:
                                sent[(name, enc)] = check(port, path, enc, name not in CEILINGS)
                                break
                            except RuntimeError:
                                time.sleep(0.3)
                        else:
                            sent[(name, enc)] = check(port, path, enc, name not in CEILINGS)
            for enc in ENCODINGS.values():
                lengths = {n: sent[(n, enc)] for n in servers if (n, enc) in sent}
                if len(set(lengths.values())) != 1:
                    raise RuntimeError(f"{human(size)} {enc}: bytes sent differ: {lengths}")
            bench.log(f"{human(size)}: identity {sent[('ceiling', None)]:,} bytes, "
                      f"gzip {sent[('ceiling', 'gzip')]:,} bytes, from every server")
            cells = {}
            for r in range(args.rounds):
                for enc_name, enc in ENCODINGS.items():
                    for name, (what, port, p) in servers.items():
                        if enc_name not in encodings(name):
                            continue
                        res = wrk(port, args.conns, args.seconds, paths_file, p.pid, enc)
                        cells.setdefault((enc_name, name), []).append(res)
                bench.log(f"{human(size)}: round {r + 1} of {args.rounds} done")
            size_res = {"identity_bytes": sent[("ceiling", None)],
                        "gzip_bytes": sent[("ceiling", "gzip")], "cells": {}}
            for (enc_name, name), runs in cells.items():
                size_res["cells"][f"{enc_name}/{name}"] = {
                    "what": servers[name][0],
                    "rps": statistics.median(x["rps"] for x in runs),
                    "cpu_us_per_req": statistics.median(x["cpu_us_per_req"] for x in runs),
                    "p99_ms": statistics.median(x["p99_ms"] for x in runs),
                }
            results["sizes"][str(size)] = size_res
            for name, (_, _, p) in servers.items():
                p.terminate()
                p.wait(timeout=30)
            if args.instructions:
                size_res["instructions"] = instruction_cells(
                    args, scratch, procs, binary, ceiling, size, tiers, redis_port, overlay,
                    paths)
        report = render(results, tiers)
        print(report)
        instructions.write_latest("bodies", results, report)
        return 0
    finally:
        instructions.clean_up(procs, scratch, args.keep)


def instruction_cells(args, scratch, procs, binary, ceiling, size, tiers, redis_port, overlay,
                      paths):
    """Instructions per hit under callgrind, per server and encoding, for one body size."""
    out = {}
    # The origin the tiers fill from (not measured).
    origin_port = bench.free_port()
    origin = procs.start(f"origin-{size}", [str(ceiling), f"127.0.0.1:{origin_port}",
                                            str(size)], {"CEILING_BODY": "json"})
    bench.wait_http(f"http://127.0.0.1:{origin_port}/")
    redis_url = f"redis://127.0.0.1:{redis_port}"
    for name in ["ceiling", "ceiling_get", *tiers]:
        for enc_name, enc in encodings(name).items():
            port = bench.free_port()
            if name in CEILINGS:
                cmd, env = [str(ceiling), f"127.0.0.1:{port}", str(size)], {"CEILING_BODY": "json"}
                if name == "ceiling_get":
                    cmd.append(redis_url)
            else:
                _, extra = TIERS[name]
                url = f"redis://127.0.0.1:{bench.free_port()}" if name == "memory" else redis_url
                cmd = [str(binary)]
                env = runcache_env(name, port, origin_port, url, overlay,
                                     {**extra, "RUNCACHE__CACHE__PREFIX":
                                      f"i{size}-{name}-{enc_name}",
                                      "RUNCACHE__L1__MAX_LIFETIME_MS": "100000"})
            out[f"{enc_name}/{name}"] = callgrind_cell(
                f"{name}-{enc_name}-{size}", cmd, env, port, paths, enc, name not in CEILINGS,
                args.hits, scratch, procs)
            bench.log(f"{human(size)} {enc_name} {name}: "
                      f"{out[f'{enc_name}/{name}']:,} instructions per hit")
    origin.terminate()
    origin.wait(timeout=30)
    return out


def callgrind_cell(label, cmd, env, port, paths, enc, runcache, hits, scratch, procs):
    p = instructions.start_callgrind(procs, label, cmd, env, ROOT, scratch)
    bench.wait_http(f"http://127.0.0.1:{port}/health" if runcache
                    else f"http://127.0.0.1:{port}/", timeout=300)
    for path in paths:
        for attempt in range(20):
            try:
                check(port, path, enc, runcache)
                break
            except RuntimeError:
                if attempt == 19:
                    raise
                time.sleep(0.5)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    check(port, paths[0], enc, runcache, conn)
    instructions.zero(p)
    for i in range(hits):
        check(port, paths[i % len(paths)], enc, runcache, conn)
    conn.close()
    return round(instructions.dump_and_stop(p, label, scratch) / hits)


def render(res, tiers):
    s = res["settings"]
    lines = [f"# large-body hits, {res['date']} ({res['commit']})", "",
             f"wrk -c{s['conns']}, {s['urls']} URLs, medians of {s['rounds']} alternating rounds "
             f"of {s['seconds']} s; ratios against bare axum sending the same bytes (its own "
             "gzip copy, made once) in the same rounds. CPU is the server process's.", "",
             "| body | encoding | server | requests/s | vs axum | CPU µs per hit | "
             "axum CPU / this | p99 ms | instructions per hit |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for size, sr in res["sizes"].items():
        for enc_name in ENCODINGS:
            base = sr["cells"].get(f"{enc_name}/ceiling")
            sent = sr["identity_bytes"] if enc_name == "identity" else sr["gzip_bytes"]
            for name in ["ceiling", "ceiling_get", *tiers]:
                if enc_name not in encodings(name):
                    continue
                c = sr["cells"].get(f"{enc_name}/{name}")
                instr = sr.get("instructions", {}).get(f"{enc_name}/{name}")
                what = CEILINGS.get(name) or TIERS[name][0]
                wrk_cols = (f"{c['rps']:,.0f} | {c['rps'] / base['rps']:.3f} | "
                            f"{c['cpu_us_per_req']:.1f} | "
                            f"{base['cpu_us_per_req'] / c['cpu_us_per_req']:.3f} | "
                            f"{c['p99_ms']:.2f}") if c else "– | – | – | – | –"
                lines.append(f"| {human(int(size))} | {enc_name} ({sent:,} B) | {what} | "
                             f"{wrk_cols} | {f'{instr:,}' if instr else '–'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
