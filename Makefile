# Quick start: `make run` chats with the default model; `make test` runs every test.
MODEL ?= models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: run serve test models pydeps build bench bench-serve lint

models:
	@scripts/fetch-models.sh

# The official OpenAI client, which the server tests drive the server with,
# and jsonschema (with its format checkers), which checks structured
# outputs and the arguments of tool calls.
pydeps:
	@python3 -c "import openai, jsonschema, fqdn, rfc3987, rfc3339_validator" 2>/dev/null || python3 -m pip install -q "openai>=1.50" "jsonschema[format]>=4"

build:
	cargo build --release

run: models build
	target/release/ruvllm chat --model $(MODEL)

# Kernel copies below the best one (which plain runs use) that this CPU can run.
LOWER_SIMD := portable $(shell grep -qw avx512_vnni /proc/cpuinfo 2>/dev/null && grep -qw avx2 /proc/cpuinfo && echo avx2)

test: models pydeps
	cargo test --release
	# The other kernel copies against the same references.
	for l in $(LOWER_SIMD); do RUVLLM_SIMD=$$l cargo test --release --test fixtures --test quant --test rope --test lora --test isq || exit 1; done
	# Unit tests with debug assertions on (the dev profile): the KV cache's
	# and scheduler's invariants are debug_asserts.
	cargo test --lib

serve: models build
	target/release/ruvllm serve --model $(MODEL)

bench: models
	scripts/bench-vs-llamacpp.sh 2 5

bench-serve: models
	scripts/bench-serve-vs-llamacpp.sh 2 16 3

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets --release -- -D warnings
