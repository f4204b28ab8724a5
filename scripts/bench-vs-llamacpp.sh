#!/usr/bin/env bash
# Side-by-side throughput of ruvllm and llama.cpp's llama-bench on the same
# models, threads and test sizes, in one run. Run it on a quiet machine.
# Usage: scripts/bench-vs-llamacpp.sh [threads] [repetitions]
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-2}
R=${2:-5}
scripts/fetch-models.sh
scripts/build-llamacpp.sh >/dev/null
cargo build --release --quiet
LB=.bench/llama.cpp/build/bin/llama-bench
for m in models/SmolLM2-135M-Instruct.Q4_1.gguf models/gemma-3-270m-q4_k_m.gguf; do
    echo "## $(basename "$m"), $T threads"
    echo "### llama.cpp"
    "$LB" -m "$m" -p 512 -n 128 -t "$T" -r "$R" -o md 2>/dev/null | grep -E '^\|'
    echo "### ruvllm"
    target/release/ruvllm bench -m "$m" -p 512 -n 128 -t "$T" -r "$R"
done
