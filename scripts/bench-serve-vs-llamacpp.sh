#!/usr/bin/env bash
# Serving under load, ruvllm against llama.cpp's llama-server on the same
# model, threads and load. Each round starts one server, warms it up, drives
# it with `ruvllm bench-serve` (1 client, then N concurrent streaming clients
# with ~90-token prompts and 128 output tokens each), samples its RSS, then
# stops it; the engines alternate for several rounds and the table reports
# medians. Then both run ten requests sharing a ~1000-token prefix.
# Run it on a quiet machine: no build, no tests.
# Usage: scripts/bench-serve-vs-llamacpp.sh [threads] [clients] [rounds] [model]
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-2}
N=${2:-16}
ROUNDS=${3:-3}
MODEL=${4:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
PORT=8079
scripts/fetch-models.sh
scripts/build-llamacpp.sh >/dev/null
cargo build --release --quiet
R=target/release/ruvllm
out=$(mktemp)

start() { # engine [slots] [context per slot]: llama-server splits its context among slots
    local np=${2:-$N} per=${3:-256}
    case $1 in
    ruvllm) $R serve -m "$MODEL" -t "$T" --port $PORT --idle-trim-secs 5 >/dev/null 2>&1 & ;;
    llama-server) .bench/llama.cpp/build/bin/llama-server -m "$MODEL" -t "$T" -np "$np" \
        -c $((np * per)) --port $PORT >/dev/null 2>&1 & ;;
    esac
    PID=$!
    for _ in $(seq 300); do
        curl -sf localhost:$PORT/health >/dev/null && break
        sleep 0.2
    done
    $R bench-serve --url http://127.0.0.1:$PORT -c 1 --requests 1 --max-tokens 8 --label warmup >/dev/null
}

rss() { awk '/VmRSS/ {print int($2 / 1024)}' /proc/$PID/status; }

peak_rss() { # samples RSS until the file $1 exists, prints the peak
    local peak=0 r
    while [ ! -e "$1" ]; do
        r=$(rss)
        [ "$r" -gt "$peak" ] && peak=$r
        sleep 0.2
    done
    echo $peak
}

for round in $(seq "$ROUNDS"); do
    for engine in llama-server ruvllm; do
        start $engine
        idle=$(rss)
        $R bench-serve --url http://127.0.0.1:$PORT -c 1 --requests 3 --label $engine --json >>"$out"
        flag=$(mktemp -u)
        peak_rss "$flag" >"$flag.peak" &
        SAMPLER=$!
        $R bench-serve --url http://127.0.0.1:$PORT -c "$N" --requests $((2 * N)) --label $engine --json >>"$out"
        touch "$flag"
        wait $SAMPLER
        sleep 7 # past ruvllm's idle trim
        echo "{\"label\":\"$engine\",\"rss_idle\":$idle,\"rss_peak\":$(cat "$flag.peak"),\"rss_after\":$(rss)}" >>"$out"
        rm -f "$flag" "$flag.peak"
        kill $PID
        wait $PID 2>/dev/null || true
    done
done
for engine in llama-server ruvllm; do
    start $engine 1 4096
    $R bench-serve --url http://127.0.0.1:$PORT --shared-prefix 1000 --requests 10 --max-tokens 4 --label $engine --json >>"$out"
    kill $PID
    wait $PID 2>/dev/null || true
done

python3 - "$out" "$T" "$N" "$ROUNDS" "$MODEL" <<'PY'
import sys, json, statistics as st, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
T, N, rounds, model = sys.argv[2:]
load = collections.defaultdict(list)
mem = collections.defaultdict(list)
prefix = {}
for r in rows:
    if "rss_idle" in r:
        mem[r["label"]].append(r)
    elif "ttft_first_s" in r:
        prefix[r["label"]] = r
    else:
        load[(r["label"], r["clients"])].append(r)
med = lambda rs, k: st.median(x[k] for x in rs)
print(f"{model.split('/')[-1]}, {T} threads, {rounds} alternating rounds (medians); {N} clients send {2*int(N)} requests of ~90 prompt and 128 output tokens\n")
print("| server | clients | output tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) |")
print("| --- | ---: | ---: | ---: | ---: |")
for (label, c), rs in sorted(load.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    print(f"| {label} | {c} | {med(rs,'output_tok_per_s'):.1f} | {med(rs,'ttft_p50_s'):.2f} / {med(rs,'ttft_p99_s'):.2f} | {1e3*med(rs,'itl_p50_s'):.1f} / {1e3*med(rs,'itl_p99_s'):.1f} |")
ours, theirs = load[("ruvllm", int(N))], load[("llama-server", int(N))]
single = load[("ruvllm", 1)]
print(f"\nruvllm / llama-server at {N} clients: {med(ours,'output_tok_per_s')/med(theirs,'output_tok_per_s'):.2f}× output tokens/s; "
      f"TTFT p99 {med(ours,'ttft_p99_s'):.2f} s vs {med(theirs,'ttft_p99_s'):.2f} s")
print(f"ruvllm at {N} clients / ruvllm with 1 client: {med(ours,'output_tok_per_s')/med(single,'output_tok_per_s'):.2f}×\n")
print("| server | RSS idle (MiB) | peak under load | 7 s after |")
print("| --- | ---: | ---: | ---: |")
for label, rs in mem.items():
    print(f"| {label} | {med(rs,'rss_idle'):.0f} | {med(rs,'rss_peak'):.0f} | {med(rs,'rss_after'):.0f} |")
print("\nTen requests sharing a ~1000-token prefix, one after another:\n")
print("| server | prompt tokens | TTFT first (s) | later TTFT max (s) | later / first | cached tokens reported |")
print("| --- | ---: | ---: | ---: | ---: | --- |")
for label, r in prefix.items():
    cached = r["cached_tokens"][1:]
    shown = f"{min(cached)}–{max(cached)}" if all(c is not None for c in cached) else "not reported"
    print(f"| {label} | {r['prompt_tokens']} | {r['ttft_first_s']:.3f} | {r['ttft_rest_max_s']:.3f} | {100*r['rest_over_first']:.0f}% | {shown} |")
PY
rm -f "$out"
