#!/usr/bin/env bash
# llama.cpp's own quantizer output for tests/isq.rs: the tiny llama fixture
# quantized by llama-quantize --pure to each legacy type. Run once, by hand;
# the files are committed (tests/fixtures/isq/, ~600 KB in all).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-llamacpp.sh >/dev/null
FIXTURES=${RUVLLM_FIXTURES:-../shared/fixtures}
mkdir -p tests/fixtures/isq
for t in Q8_0 Q4_0 Q4_1 Q5_0 Q5_1; do
    .bench/llama.cpp/build/bin/llama-quantize --pure "$FIXTURES/llama/model-f32.gguf" \
        "tests/fixtures/isq/llama-$t.gguf" "$t" >/dev/null 2>&1
done
ls -l tests/fixtures/isq
