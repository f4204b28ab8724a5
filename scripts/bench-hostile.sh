#!/usr/bin/env bash
# Hostile load against `ruvllm serve`: REQUESTS requests, a share BAD of them
# malformed, half-bad (one bad prompt in a batch) or abandoned (streams
# dropped after one chunk, waits and embeddings given up, heads and bodies
# sent halfway). Afterwards nothing may be in flight or hold KV blocks, the
# server's RSS (after its idle trim, which here also drops the prefix cache,
# so retained cache pages do not count as growth) must be back within 10% of
# where it started after warm-up, and a normal request must get 200.
# Run it on a quiet machine: no build, no tests.
# Usage: scripts/bench-hostile.sh [requests] [bad share] [clients] [model]
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${1:-10000}
BAD=${2:-0.3}
CLIENTS=${3:-16}
MODEL=${4:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
PORT=8078
scripts/fetch-models.sh
cargo build --release --quiet
R=target/release/ruvllm
$R serve -m "$MODEL" -t 2 --port $PORT --idle-trim-secs 2 --idle-trim-drops-cache >/dev/null 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    curl -sf localhost:$PORT/health >/dev/null && break
    sleep 0.2
done
out=$($R bench-hostile --url http://127.0.0.1:$PORT --requests "$REQUESTS" --bad-fraction "$BAD" \
    -c "$CLIENTS" --pid $PID --settle-secs 4 --json)
echo "$out"
python3 - "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
change = r["rss_change"]
print(f"{r['requests']} requests ({r['bad_fraction']:.0%} bad) in {r['wall_s']:.0f} s; "
      f"drained {r['drained']} in {r['drain_s']:.2f} s; server errors {r['server_errors']}; "
      f"RSS {r['rss_start_mib']:.0f} -> {r['rss_end_mib']:.0f} MiB ({change:+.1%}); "
      f"normal request after: {r['normal_request_after']}")
sys.exit(0 if r["drained"] and abs(change) <= 0.10 and r["normal_request_after"] == "200" else 1)
PY
