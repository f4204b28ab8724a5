#!/usr/bin/env bash
# Records llama.cpp's perplexity of the default models on the shared text
# (tests/fixtures/llama-perplexity.json), for tests/perplexity.rs. Run once,
# by hand, after scripts/fetch-models.sh; llama.cpp is built by
# scripts/build-llamacpp.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-llamacpp.sh >/dev/null
BIN=.bench/llama.cpp/build/bin/llama-perplexity
TEXT=${TEXT:-../shared/text/licenses-gpl3-apache2.txt}
COMMIT="0c1e57098 (llama-cpp-python 0.3.36)"
out=tests/fixtures/llama-perplexity.json
{
  echo "{"
  echo "  \"llama_cpp_commit\": \"$COMMIT\","
  echo "  \"text\": \"$(basename "$TEXT")\","
  echo "  \"ctx\": 512,"
  echo "  \"models\": {"
  first=1
  # The running estimate after each window: [1]16.32,[2]17.71,...
  running() { grep -o '\[[0-9]*\][0-9.]*' <<<"$1" | sed 's/\[[0-9]*\]//' | paste -sd, -; }
  for m in SmolLM2-135M-Instruct.Q4_1.gguf gemma-3-270m-q4_k_m.gguf; do
    log=$("$BIN" -m "models/$m" -f "$TEXT" -c 512 -t 2 2>&1)
    final=$(grep -o 'Final estimate: PPL = [0-9.]*' <<<"$log" | awk '{print $5}')
    [ $first = 1 ] || echo "    ,"
    first=0
    echo "    \"$m\": {\"ppl\": $final, \"running\": [$(running "$log")],"
    # Quantized KV caches (flash attention is what lets llama.cpp quantize
    # values; it rotates keys and values by a Hadamard matrix, as we do).
    echo "      \"kv\": {"
    sep=""
    for kv in q8_0 q4_0; do
      log=$("$BIN" -m "models/$m" -f "$TEXT" -c 512 -t 2 -fa on -ctk $kv -ctv $kv 2>&1)
      echo "        $sep\"$kv\": [$(running "$log")]"
      sep=","
    done
    echo "      }"
    echo "    }"
  done
  echo "  }"
  echo "}"
} > "$out"
echo "wrote $out"
