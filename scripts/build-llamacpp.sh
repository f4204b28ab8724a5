#!/usr/bin/env bash
# Builds llama.cpp's llama-bench (and llama-server) from the llama-cpp-python
# source package, for side-by-side benchmarks. Output: .bench/llama.cpp/build/bin/
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
dir=.bench
mkdir -p "$dir"
bin="$dir/llama.cpp/build/bin"
if [ -x "$bin/llama-bench" ] && [ -x "$bin/llama-server" ]; then exit 0; fi
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
cmake --build "$dir/llama.cpp/build" --target llama-bench llama-server -j "$(nproc)"
