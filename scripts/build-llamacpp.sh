#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-server, llama-perplexity and
# llama-quantize from the llama-cpp-python source package (which vendors
# llama.cpp 0c1e57098), for side-by-side benchmarks and reference figures.
# Output: .bench/llama.cpp/build/bin/
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
dir=.bench
mkdir -p "$dir"
bin="$dir/llama.cpp/build/bin"
tools="llama-bench llama-server llama-perplexity llama-quantize"
missing=0
for t in $tools; do [ -x "$bin/$t" ] || missing=1; done
[ $missing = 1 ] || exit 0
command -v cmake >/dev/null || { echo "cmake is needed (apt-get install cmake)" >&2; exit 1; }
if [ ! -d "$dir/llama.cpp" ]; then
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -d "$dir"
    tar -xzf "$dir/llama_cpp_python-$VERSION.tar.gz" -C "$dir"
    mv "$dir/llama_cpp_python-$VERSION/vendor/llama.cpp" "$dir/llama.cpp"
    rm -rf "$dir/llama_cpp_python-$VERSION"
fi
cmake -S "$dir/llama.cpp" -B "$dir/llama.cpp/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$dir/llama.cpp/build" --target $tools -j "$(nproc)"
