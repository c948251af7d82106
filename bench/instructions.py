#!/usr/bin/env python3
"""Work per hit in units the machine's noise cannot move (bench/run.sh runs it after the wrk
table; standard library only, plus valgrind and redis-server).

For each tier, and for the two ceilings bench.py measures throughput against:
  - instructions per hit: the server runs under `valgrind --tool=callgrind`; after warming
    every URL its counters are zeroed (`callgrind_control -z`), a fixed number of hits is sent
    over a fixed number of keep-alive connections, and the counters are dumped
    (`callgrind_control -d`): their total over the hits. Every thread of the server counts.
  - Redis commands per hit, by command (`INFO commandstats` around the hits, less what the
    server sends on its own over an idle window of the same length: probes, version polls),
    and Redis's own time per hit (commandstats `usec`).

    python3 bench/instructions.py                     # print, and compare with bench/baseline.json
    python3 bench/instructions.py --write-baseline    # record this build as the baseline
    python3 bench/instructions.py --hits 2000 --tiers memory,ceiling

Compare a change with main by the instruction ratio (this build / baseline) per tier: it moves
by well under 1 % between runs of one build, where wrk's throughput moves by 2x in an hour.
"""

import argparse
import concurrent.futures
import datetime
import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the same helpers and binaries as the wrk table)

ROOT = bench.ROOT
BASELINE = ROOT / "bench/baseline.json"

# name -> (what, check header, check value)
TIERS = {
    "ceiling": ("bare axum (ceiling)", "content-type", "application/json"),
    "ceiling_get": ("axum + one Redis GET (Redis ceiling)", "content-type", "application/json"),
    "memory": ("runcache memory tier (no Redis)", "x-cache", "HIT"),
    "redis_only": ("runcache Redis only (near cache off)", "x-cache", "HIT"),
    "default": ("runcache default (Redis + near cache)", "x-cache", "HIT"),
    # Redis only on a private 3-primary Redis Cluster: its commands are summed over the nodes.
    "cluster_only": ("runcache Redis only on a 3-primary cluster", "x-cache", "HIT"),
}
# The command the harness itself sends to Redis around the hits (not runcache's).
HARNESS_COMMANDS = {"info"}


def commandstats(ports):
    """{command: (calls, usec)} from INFO commandstats, summed over the Redis servers on
    `ports` (the nodes of a cluster)."""
    stats = {}
    for port in ports:
        out = bench.redis_cli(port, "INFO", "commandstats")
        for m in re.finditer(r"^cmdstat_([^:]+):calls=(\d+),usec=(\d+)", out, re.M):
            calls, usec = stats.get(m.group(1), (0, 0))
            stats[m.group(1)] = (calls + int(m.group(2)), usec + int(m.group(3)))
    return stats


def diff(after, before):
    return {k: (c - before.get(k, (0, 0))[0], u - before.get(k, (0, 0))[1])
            for k, (c, u) in after.items()
            if k not in HARNESS_COMMANDS and c - before.get(k, (0, 0))[0] > 0}


def send_hits(port, paths, hits, conns, check_header, check_value):
    """`hits` GETs over `conns` keep-alive connections, paths round-robin; returns how many
    were not 200 with the check header."""
    per = hits // conns

    def worker(w):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        bad = 0
        for i in range(per):
            # As wrk: no Accept-Encoding (http.client would add `identity`, and a request
            # with that header takes runcache's full path, not its hit lane).
            conn.putrequest("GET", paths[(w * per + i) % len(paths)], skip_accept_encoding=True)
            conn.endheaders()
            resp = conn.getresponse()
            resp.read()
            value = resp.getheader(check_header, "")
            bad += resp.status != 200 or not value.startswith(check_value)
        conn.close()
        return bad

    with concurrent.futures.ThreadPoolExecutor(conns) as pool:
        return sum(pool.map(worker, range(conns))), per * conns


def wait_redis(port):
    """Waits until the redis-server on `port` answers PING."""
    deadline = time.time() + 20
    while True:
        try:
            if bench.redis_cli(port, "PING") == "PONG":
                return
        except subprocess.CalledProcessError:
            pass
        if time.time() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.1)


def start_callgrind(procs, label, cmd, env, cwd, scratch):
    """`cmd` started under callgrind, its dumps written to `scratch` as `cg-{label}.<pid>.*`."""
    vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={scratch}/cg-{label}.%p",
          "--dump-instr=no", "--dump-line=no"]
    return procs.start(f"vg-{label}", vg + cmd, env, cwd=cwd)


def zero(p):
    """Zeroes the counters of the server `p` runs under callgrind."""
    subprocess.run(["callgrind_control", "-z", str(p.pid)], check=True, capture_output=True)


def dump_and_stop(p, label, scratch):
    """Dumps the counters of `p` (started by `start_callgrind`), stops it, and returns the
    instructions counted since they were zeroed."""
    subprocess.run(["callgrind_control", "-d", str(p.pid)], check=True, capture_output=True)
    p.terminate()
    p.wait(timeout=60)
    dumps = sorted(scratch.glob(f"cg-{label}.{p.pid}.*"), key=lambda f: f.stat().st_mtime)
    if not dumps:
        raise RuntimeError(f"{label}: no callgrind dump")
    return callgrind_total(dumps[0])


def write_latest(stem, res, report):
    """Writes `bench/results/{stem}-latest.json` and `.md` (not committed)."""
    out_dir = ROOT / "bench/results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"{stem}-latest.json").write_text(json.dumps(res, indent=2) + "\n")
    (out_dir / f"{stem}-latest.md").write_text(report)


def clean_up(procs, scratch, keep):
    """Stops every process; removes the scratch directory unless `keep`."""
    procs.stop_all()
    if keep:
        bench.log(f"callgrind dumps and logs kept in {scratch} (callgrind_annotate FILE)")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


def callgrind_total(path):
    text = Path(path).read_text(errors="replace")
    m = re.search(r"^(?:totals|summary):\s+(\d+)", text, re.M)
    if not m:
        raise RuntimeError(f"no totals in {path}")
    return int(m.group(1))


def measure(name, cmd, env, cwd, port, paths, args, scratch, procs, redis_ports):
    what, header, value = TIERS[name]
    p = start_callgrind(procs, name, cmd, env, cwd, scratch)
    bench.wait_http(f"http://127.0.0.1:{port}/health" if name not in ("ceiling", "ceiling_get")
                    else f"http://127.0.0.1:{port}/", timeout=300)
    # Under valgrind a store may land after its answer: pass over the paths until all hit.
    bench.warm(port, paths, header, value, threads=args.conns)
    for _ in range(5):
        bad, _ = send_hits(port, paths, len(paths), args.conns, header, value)
        if not bad:
            break
        time.sleep(1)
    if bad:
        raise RuntimeError(f"{what}: {bad} of {len(paths)} warm requests were not hits")
    zero(p)
    before = commandstats(redis_ports)
    t0 = time.monotonic()
    bad, sent = send_hits(port, paths, args.hits, args.conns, header, value)
    took = time.monotonic() - t0
    during = diff(commandstats(redis_ports), before)
    # What the server sends on its own over as long a window, without requests.
    before = commandstats(redis_ports)
    time.sleep(took)
    idle = diff(commandstats(redis_ports), before)
    instructions = dump_and_stop(p, name, scratch)
    per_cmd = {}
    for cmd_name, (calls, usec) in during.items():
        own = calls - idle.get(cmd_name, (0, 0))[0]
        if round(own / sent, 3) > 0:
            per_cmd[cmd_name] = round(own / sent, 3)
    usec = sum(u for _, u in during.values()) - sum(u for _, u in idle.values())
    result = {
        "what": what,
        "hits": sent,
        "not_hits": bad,
        "instructions_per_hit": round(instructions / sent),
        "redis_commands_per_hit": round(sum(per_cmd.values()), 3),
        "redis_commands_by_name": per_cmd,
        "redis_usec_per_hit": round(max(usec, 0) / sent, 2),
        "background_commands_per_s": {k: round(c / took, 1) for k, (c, _) in idle.items()},
    }
    bench.log(f"{what}: {result['instructions_per_hit']:,} instructions per hit, "
              f"{result['redis_commands_per_hit']} Redis commands per hit {per_cmd}, "
              f"{bad} of {sent} not hits, {took:.1f} s under valgrind")
    return result


def render(res, base):
    lines = [f"# work per hit, {res['date']} ({res['commit']})", "",
             f"{res['settings']['hits']} hits over {res['settings']['conns']} keep-alive "
             f"connections after warming {res['settings']['urls']} URLs of "
             f"{res['settings']['body_bytes']} bytes; instructions of the whole server process "
             f"under callgrind.", "",
             "| tier | instructions per hit | vs bare axum | Redis commands per hit | "
             "Redis µs per hit | vs baseline (instructions) |",
             "|---|---:|---:|---:|---:|---:|"]
    tiers = res["tiers"]
    bare = tiers.get("ceiling", {}).get("instructions_per_hit")
    for name, t in tiers.items():
        vs_bare = f"{bare / t['instructions_per_hit']:.3f}" if bare else "–"
        b = (base or {}).get("tiers", {}).get(name)
        vs_base = (f"{t['instructions_per_hit'] / b['instructions_per_hit']:.3f}"
                   if b else "–")
        cmds = ", ".join(f"{k} {v}" for k, v in sorted(t["redis_commands_by_name"].items()))
        lines.append(f"| {t['what']} | {t['instructions_per_hit']:,} | {vs_bare} | "
                     f"{t['redis_commands_per_hit']}{f' ({cmds})' if cmds else ''} | "
                     f"{t['redis_usec_per_hit']} | {vs_base} |")
    if base:
        lines += ["", f"Baseline: bench/baseline.json ({base.get('commit')}, {base.get('date')}); "
                  "a ratio above 1 is more work per hit than the baseline."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=str(bench.BIN))
    ap.add_argument("--ceiling", default=str(bench.CEILING))
    ap.add_argument("--hits", type=int, default=4000)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--urls", type=int, default=200)
    ap.add_argument("--tiers", default=",".join(TIERS))
    ap.add_argument("--keep", action="store_true",
                    help="keep the scratch directory (callgrind dumps, logs) and print it")
    ap.add_argument("--write-baseline", action="store_true",
                    help="write the figures to bench/baseline.json")
    args = ap.parse_args()
    tiers = [t for t in args.tiers.split(",") if t]
    unknown = set(tiers) - set(TIERS)
    if unknown:
        ap.error(f"unknown tiers {sorted(unknown)}; known: {', '.join(TIERS)}")
    scratch = Path(tempfile.mkdtemp(prefix="runcache-instr-"))
    procs = bench.Processes(scratch)
    cluster_ports = []
    try:
        redis_port = bench.free_port()
        procs.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(scratch)])
        wait_redis(redis_port)
        origin_port = bench.free_port()
        binary = Path(args.bin).resolve()
        procs.start("origin", [str(binary), "sample-origin", "--addr",
                               f"127.0.0.1:{origin_port}", "--delay-ms", "0"])
        bench.wait_http(f"http://127.0.0.1:{origin_port}/health")
        paths = [f"/api/v1/models/train/run-{i}/feature-importance?top_n=30"
                 for i in range(args.urls)]
        _, _, sample, _ = bench.http_call(origin_port, "GET", paths[0])
        body_size = len(sample)
        redis_url = f"redis://127.0.0.1:{redis_port}"
        results = {}
        for name in tiers:
            port = bench.free_port()
            if name in ("ceiling", "ceiling_get"):
                cmd = [str(Path(args.ceiling).resolve()), f"127.0.0.1:{port}", str(body_size)]
                if name == "ceiling_get":
                    cmd.append(redis_url)
                env = {}
            else:
                cmd = [str(binary)]
                env = {
                    "RUNCACHE__SERVER__ADDR": f"127.0.0.1:{port}",
                    "RUNCACHE__ORIGIN__BASE_URL": f"http://127.0.0.1:{origin_port}",
                    "RUNCACHE__REDIS__URL": (f"redis://127.0.0.1:{bench.free_port()}"
                                             if name == "memory" else redis_url),
                    "RUNCACHE__ADMIN__TOKEN": bench.TOKEN,
                    "RUNCACHE__JOURNAL__PATH": "",
                    "RUNCACHE__CACHE__PREFIX": f"instr-{name}",
                    # As in the wrk table: hits, not the origin's periodic re-validation.
                    "RUNCACHE__AUTH__VALIDATION_TTL": "86400",
                    "RUST_LOG": "warn",
                }
                if name in ("redis_only", "cluster_only"):
                    env["RUNCACHE__L1__ENABLED"] = "false"
                if name == "cluster_only":
                    if not cluster_ports:
                        cluster_ports = bench.start_cluster(scratch)
                    env["RUNCACHE__REDIS__MODE"] = "cluster"
                    env["RUNCACHE__REDIS__CLUSTER_URLS"] = ",".join(
                        f"redis://127.0.0.1:{p}" for p in cluster_ports)
                # valgrind runs the server ~50 times slower: the near cache's 2 s lifetime would
                # expire entries 50 times as often per hit as at full speed. Stretched alike.
                env["RUNCACHE__L1__MAX_LIFETIME_MS"] = "100000"
            ports = cluster_ports if name == "cluster_only" else [redis_port]
            results[name] = measure(name, cmd, env, ROOT, port, paths, args, scratch, procs,
                                    ports)
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                capture_output=True, text=True).stdout.strip()
        res = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit,
            "settings": {"hits": args.hits, "conns": args.conns, "urls": args.urls,
                         "body_bytes": body_size},
            "tiers": results,
        }
        base = json.loads(BASELINE.read_text()) if BASELINE.exists() else None
        report = render(res, base)
        print(report)
        write_latest("instructions", res, report)
        if args.write_baseline:
            BASELINE.write_text(json.dumps(res, indent=2) + "\n")
            bench.log(f"written to {BASELINE.relative_to(ROOT)}")
        return 0
    finally:
        for port in cluster_ports:  # started daemonized by bench.start_cluster
            subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"],
                           capture_output=True)
        clean_up(procs, scratch, args.keep)


if __name__ == "__main__":
    sys.exit(main())
