#!/usr/bin/env bash
# runcache benchmark: runcache (release) against nginx proxy_cache and a bare axum handler,
# on loopback only. Installs what it needs from Debian packages (wrk, nginx, redis-server),
# builds the release binary and the ceiling example, then runs bench/bench.py, which prints
# one table and writes it as Markdown and JSON under bench/results/. The table ends with how
# long 10,000 queued event-stream entries take to apply, on one Redis and on a cluster.
#
#   bash bench/run.sh            # full run: 5 alternating rounds of 5 s per cell (~6 min once built)
#   bash bench/run.sh --smoke    # one short round of everything (under a minute once built)
#   bash bench/run.sh --rounds 5 --seconds 10
#   bash bench/run.sh --baseline-rev a60c70f   # also measure that commit's binary, same rounds
#   bash bench/run.sh --redis-death-only       # only the origin calls over the first 3 s after a
#                                              # Redis SIGKILL under load on 100 hot keys, against
#                                              # 3 s of the same load with Redis up (~20 s)
#   python3 bench/bench.py --redis-death-only --runcache-bin target/debug/runcache   # same, any build
#   bash bench/run.sh --failover-only          # only the origin calls over 10 s after a planned
#                                              # CLUSTER FAILOVER of every shard under load on 100
#                                              # hot keys, against 10 s of steady state (~40 s)
#   bash bench/run.sh --only-stream            # only the stream drain (--events N: not 10,000)
#   bash bench/run.sh --self-test              # check bench.py's reply parsing (no build, no server)
#   bash bench/run.sh --instructions-only      # only the work per hit: instructions under callgrind
#                                              # and Redis commands per hit, per tier, against
#                                              # bench/baseline.json, on one Redis and on a
#                                              # 3-primary cluster (~2 min; noise does not move it)
#   bash bench/run.sh --bodies-only            # only hits of 400 KB and 4 MB bodies, identity and
#                                              # gzip, against axum sending the same bytes: wrk
#                                              # ratios and instructions per hit (bench/bodies.py,
#                                              # ~5 min)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--self-test" ]; then
    exec python3 bench/bench.py --self-test
fi

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v pgrep >/dev/null 2>&1 || missing+=(procps)
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]} =="
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" </dev/null
fi
export PATH="$PATH:/usr/sbin"

echo "== cargo build --release (runcache, ceiling example) =="
cargo build --release --locked --bin runcache --example ceiling

# --baseline-rev REV: build REV's runcache in a throw-away worktree (its own target dir under
# target/, so incremental rebuilds are cheap) and measure it beside this one.
args=()
while [ $# -gt 0 ]; do
    if [ "$1" = "--baseline-rev" ] && [ $# -ge 2 ]; then
        rev=$2
        shift 2
        tree=target/bench-baseline/src
        rm -rf "$tree"
        git worktree prune
        git worktree add --detach "$tree" "$rev" >/dev/null
        echo "== cargo build --release (baseline $rev) =="
        (cd "$tree" && CARGO_TARGET_DIR="$PWD/../target" cargo build --release --locked --bin runcache)
        # The baseline reads its own config/default.toml (relative to its working directory).
        rm -rf target/bench-baseline/config
        cp -r "$tree/config" target/bench-baseline/config
        args+=(--baseline target/bench-baseline/target/release/runcache --baseline-label "$(git rev-parse --short "$rev")")
        git worktree remove --force "$tree"
    else
        args+=("$1")
        shift
    fi
done

# The wrk table (bench.py), then the work per hit in units the machine's noise cannot move
# (bench/instructions.py: instructions under callgrind, Redis commands per hit), compared with
# bench/baseline.json. The single-measure modes skip the second; --instructions-only skips the
# first.
wrk=1
instr=1
bodies=1
instr_args=()
bodies_args=(--instructions)
bench_args=()
for a in ${args[@]+"${args[@]}"}; do
    case "$a" in
        --instructions-only) wrk= ; bodies= ;;
        --bodies-only) wrk= ; instr= ;;
        --redis-death-only|--failover-only|--only-stream) instr= ; bodies= ;;
        --smoke) instr_args+=(--hits 800); bodies_args=(--rounds 1 --seconds 1); bench_args+=("$a") ;;
        *) bench_args+=("$a") ;;
    esac
done
if [ -n "$wrk" ]; then
    python3 bench/bench.py ${bench_args[@]+"${bench_args[@]}"}
fi
if [ -n "$instr" ]; then
    echo "== work per hit (bench/instructions.py; baseline bench/baseline.json) =="
    python3 bench/instructions.py ${instr_args[@]+"${instr_args[@]}"}
fi
if [ -n "$bodies" ]; then
    echo "== large bodies (bench/bodies.py) =="
    python3 bench/bodies.py "${bodies_args[@]}"
fi
