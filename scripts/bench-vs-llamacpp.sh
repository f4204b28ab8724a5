#!/usr/bin/env bash
# Side-by-side throughput of ruvllm and llama.cpp's llama-bench on the same
# models, threads and test sizes. The two alternate for several rounds so that
# drifts in machine speed hit both alike; the table reports the median of the
# rounds' means and the ratio ruvllm / llama.cpp. Run it on a quiet machine.
# Usage: scripts/bench-vs-llamacpp.sh [threads] [rounds] [repetitions per round]
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-2}
ROUNDS=${2:-3}
R=${3:-3}
scripts/fetch-models.sh
scripts/build-llamacpp.sh >/dev/null
cargo build --release --quiet
LB=.bench/llama.cpp/build/bin/llama-bench
out=$(mktemp)
for m in models/SmolLM2-135M-Instruct.Q4_1.gguf models/gemma-3-270m-q4_k_m.gguf; do
    for round in $(seq "$ROUNDS"); do
        "$LB" -m "$m" -p 512 -n 128 -t "$T" -r "$R" -o jsonl 2>/dev/null |
            python3 -c 'import sys,json
for l in sys.stdin:
    d=json.loads(l); t="pp%d"%d["n_prompt"] if d["n_gen"]==0 else "tg%d"%d["n_gen"]
    print(json.dumps({"engine":"llama.cpp","model":sys.argv[1],"test":t,"ts":d["avg_ts"]}))' "$m" >>"$out"
        target/release/ruvllm bench -m "$m" -p 512 -n 128 -t "$T" -r "$R" --json |
            python3 -c 'import sys,json
for l in sys.stdin:
    d=json.loads(l); print(json.dumps({"engine":"ruvllm","model":sys.argv[1],"test":d["test"],"ts":d["avg_ts"]}))' "$m" >>"$out"
    done
done
python3 - "$out" "$T" "$ROUNDS" "$R" <<'PY'
import sys, json, statistics, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
by = collections.defaultdict(list)
for r in rows:
    by[(r["model"].split("/")[-1], r["test"], r["engine"])].append(r["ts"])
print(f"threads {sys.argv[2]}, {sys.argv[3]} alternating rounds of {sys.argv[4]} repetitions; tokens/s, median of round means (min–max)\n")
print("| model | test | llama.cpp | ruvllm | ruvllm / llama.cpp |")
print("| --- | --- | ---: | ---: | ---: |")
for (model, test) in dict.fromkeys((k[0], k[1]) for k in by):
    l, r = by[(model, test, "llama.cpp")], by[(model, test, "ruvllm")]
    fmt = lambda v: f"{statistics.median(v):.1f} ({min(v):.0f}–{max(v):.0f})"
    print(f"| {model} | {test} | {fmt(l)} | {fmt(r)} | {statistics.median(r)/statistics.median(l):.2f}× |")
PY
rm -f "$out"
