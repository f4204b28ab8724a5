#!/usr/bin/env bash
# Speculative decoding (prompt lookup) against plain decoding, interleaved
# round by round on the same model and threads:
#  - an input-grounded task: a ~600-token passage of ../shared/text (or
#    $TEXT) to copy out, 256 tokens, greedy;
#  - open-ended chat: a story, 256 tokens, greedy;
#  - 16 concurrent streaming clients against `ruvllm serve` (bench-serve).
# Single-stream figures are decode tokens/s as `ruvllm run --verbose`
# reports them (prompt excluded); the outputs of both settings are compared
# token for token. Run it on a quiet machine: no build, no tests.
# Usage: scripts/bench-speculative.sh [threads] [rounds] [model]
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-2}
ROUNDS=${2:-3}
MODEL=${3:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=${TEXT:-../shared/text/licenses-gpl3-apache2.txt}
PORT=8078
scripts/fetch-models.sh
cargo build --release --quiet
R=target/release/ruvllm
out=$(mktemp)
doc=$(mktemp)
python3 - "$TEXT" >"$doc" <<'EOF'
import sys
text = open(sys.argv[1]).read()[3000:5500]
print("Here is a text:\n\n" + text + "\n\nRepeat the text above exactly, word for word:\n")
EOF
story="Tell me a long story about a dragon who learns to cook."

single() { # label k prompt
    local o
    o=$($R run -m "$MODEL" -t "$T" --chat --prompt "$3" -n 256 --temperature 0 --spec-tokens "$2" --verbose 2>&1 >"$out.$1.$2.txt" | grep '^prompt:')
    echo "$o" | sed -E 's/.*generated [0-9]+ tokens in [0-9.]+s \(([0-9.]+) tok\/s\).*/\1/'
}

serve16() { # k
    $R serve -m "$MODEL" -t "$T" --port $PORT --spec-tokens "$1" >/dev/null 2>&1 &
    local pid=$!
    for _ in $(seq 100); do curl -sf localhost:$PORT/health >/dev/null && break; sleep 0.2; done
    $R bench-serve --url http://127.0.0.1:$PORT -c 16 --requests 32 --max-tokens 128 --json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["output_tok_per_s"])'
    kill $pid; wait $pid 2>/dev/null || true
}

declare -A sum
for r in $(seq "$ROUNDS"); do
    for k in 0 4; do
        sum[copy.$k]+=" $(single copy $k "$(cat "$doc")")"
        sum[story.$k]+=" $(single story $k "$story")"
        sum[serve.$k]+=" $(serve16 $k)"
    done
    echo "round $r: ${sum[copy.0]##* } / ${sum[copy.4]##* } (copy), ${sum[story.0]##* } / ${sum[story.4]##* } (story), ${sum[serve.0]##* } / ${sum[serve.4]##* } (16 clients)" >&2
done
for t in copy story; do
    cmp -s "$out.$t.0.txt" "$out.$t.4.txt" || { echo "outputs differ on $t" >&2; exit 1; }
done
python3 - "${sum[copy.0]}" "${sum[copy.4]}" "${sum[story.0]}" "${sum[story.4]}" "${sum[serve.0]}" "${sum[serve.4]}" <<'EOF'
import statistics, sys
v = [[float(x) for x in a.split()] for a in sys.argv[1:]]
m = [statistics.median(x) for x in v]
print("| test | off (tok/s) | on (tok/s) | on / off |")
print("| --- | ---: | ---: | ---: |")
for i, name in enumerate(["copy a ~600-token passage, 256 tokens", "open-ended story, 256 tokens", "16 streaming clients (bench-serve)"]):
    print(f"| {name} | {m[2*i]:.1f} | {m[2*i+1]:.1f} | {m[2*i+1]/m[2*i]:.2f}x |")
EOF
rm -f "$out"* "$doc"
