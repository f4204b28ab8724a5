# Quick start: `make run` chats with the default model; `make test` runs every test.
MODEL ?= models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: run test models build bench lint

models:
	@scripts/fetch-models.sh

build:
	cargo build --release

run: models build
	target/release/ruvllm chat --model $(MODEL)

test: models
	cargo test --release
	# The portable (non-SIMD) kernels against the same references.
	RUVLLM_NO_SIMD=1 cargo test --release --test fixtures --test quant

bench: models
	scripts/bench-vs-llamacpp.sh 2 5

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets --release -- -D warnings
