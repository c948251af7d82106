#!/usr/bin/env bash
# Hit-path cost of frontend access control: runcache (release) serving one cached view to
# wrk on loopback, with auth.frontend = none, forward and jwt, in alternating rounds.
# Prints requests/s and latency per mode and the ratio against `none`.
# Needs: wrk, redis-server, python3. Usage: bash bench/auth-cost.sh [rounds] [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-5}
command -v wrk >/dev/null || { echo "install wrk (apt-get install -y wrk)"; exit 1; }
cargo build --release --locked -q
bin=target/release/runcache
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rport=$(free_port); oport=$(free_port)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; redis-cli -p "$rport" shutdown nosave >/dev/null 2>&1 || true; }
trap cleanup EXIT
redis-server --port "$rport" --save "" --appendonly no --daemonize yes >/dev/null
"$bin" sample-origin --addr "127.0.0.1:$oport" --delay-ms 0 >/dev/null 2>&1 & pids+=($!)
secret=bench-jwt-secret
jwt=$(python3 - "$secret" <<'PY'
import base64, hashlib, hmac, json, sys, time
b = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=")
h = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()); p = b(json.dumps({"sub": "bench", "exp": int(time.time()) + 3600}).encode())
print((h + b"." + p + b"." + b(hmac.new(sys.argv[1].encode(), h + b"." + p, hashlib.sha256).digest())).decode())
PY
)
start() { # mode port
  RUNCACHE__SERVER__ADDR="127.0.0.1:$2" RUNCACHE__ORIGIN__BASE_URL="http://127.0.0.1:$oport" \
  RUNCACHE__REDIS__URL="redis://127.0.0.1:$rport" RUNCACHE__ADMIN__TOKEN=bench \
  RUNCACHE__CACHE__PREFIX="bench-$1" RUNCACHE__JOURNAL__PATH="" RUNCACHE__AUTH__FRONTEND="$1" \
  RUNCACHE__AUTH__JWT_SECRET="$secret" RUST_LOG=warn "$bin" >/dev/null 2>&1 & pids+=($!)
}
declare -A port
for mode in none forward jwt; do port[$mode]=$(free_port); start "$mode" "${port[$mode]}"; done
sleep 1
url() { echo "http://127.0.0.1:${port[$1]}/api/v1/models/train/42/metrics"; }
auth() { case $1 in jwt) echo "Bearer $jwt";; *) echo "Bearer user-token";; esac; }
for mode in none forward jwt; do curl -fs -o /dev/null -H "Authorization: $(auth $mode)" "$(url $mode)"; done
declare -A rps lat
for r in $(seq "$rounds"); do
  for mode in none forward jwt; do
    out=$(wrk -t2 -c8 -d"${secs}s" --latency -H "Authorization: $(auth $mode)" "$(url $mode)")
    rps[$mode]="${rps[$mode]:-} $(echo "$out" | awk '/Requests\/sec/ {print $2}')"
    lat[$mode]="${lat[$mode]:-} $(echo "$out" | awk '$1=="50%" {print $2}')"
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
base=$(echo "${rps[none]}" | median)
printf '%-8s %12s %10s %s\n' mode "req/s(med)" "vs none" "p50 latency per round"
for mode in none forward jwt; do
  m=$(echo "${rps[$mode]}" | median)
  printf '%-8s %12s %10s %s\n' "$mode" "$m" "$(python3 -c "print(f'{$m/$base:.2f}')")" "${lat[$mode]}"
done
