# Quick start: `make run` chats with the default model; `make test` runs every test.
MODEL ?= models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: run serve test models pydeps build bench bench-serve lint

models:
	@scripts/fetch-models.sh

# The official OpenAI client, which tests/server.rs drives the server with.
pydeps:
	@python3 -c "import openai" 2>/dev/null || python3 -m pip install -q "openai>=1.50"

build:
	cargo build --release

run: models build
	target/release/ruvllm chat --model $(MODEL)

test: models pydeps
	cargo test --release
	# The portable (non-SIMD) kernels against the same references.
	RUVLLM_NO_SIMD=1 cargo test --release --test fixtures --test quant --test rope

serve: models build
	target/release/ruvllm serve --model $(MODEL)

bench: models
	scripts/bench-vs-llamacpp.sh 2 5

bench-serve: models
	scripts/bench-serve-vs-llamacpp.sh 2 16 3

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets --release -- -D warnings
