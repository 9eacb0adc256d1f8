#!/usr/bin/env bash
# Build llama.cpp's own benchmark tools (llama-bench, llama-server, llama-quantize,
# llama-perplexity) from the source that llama-cpp-python's sdist vendors, so the peer is
# measured with its own tools at the version the tests pin.
#
#   bash benchmarks/build_llama_cpp.sh [DIR]      # default DIR: ~/.cache/ember/llama.cpp
#
# Needs cmake and a C++ compiler; about ten minutes on two cores. The tools land in
# DIR/build/bin; benchmarks/real_model.py looks there (or takes --llama-bin).
set -euo pipefail
VERSION=0.3.36
DIR=${1:-$HOME/.cache/ember/llama.cpp}
mkdir -p "$DIR"
cd "$DIR"
if [ ! -d "llama_cpp_python-$VERSION" ]; then
  pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
cmake --build build -j "$(nproc)" --target llama-bench llama-server llama-quantize llama-perplexity
ls -l build/bin
