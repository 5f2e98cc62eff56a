#!/usr/bin/env bash
# Build llama.cpp's llama-server for `codecomplete bench llamaserver` (benchmark only; never
# a dependency of codecomplete). The llama.cpp sources come from the llama-cpp-python sdist on
# PyPI (it vendors them under vendor/llama.cpp), so this needs only the package registry.
#
#   build_llama_server.sh [WORK_DIR]      default WORK_DIR: $CODECOMPLETE_CACHE/llama-server
#                                         (~/.cache/codecomplete/llama-server)
# Environment: PIP (default: pip), JOBS (default: number of cores), LLAMA_CPP_PYTHON_VERSION
# (pin a release, e.g. 0.3.16; default: the newest). CPU build, -DGGML_NATIVE=ON, Release.
# Prints the path of the built binary on its last line.
set -euo pipefail

cache_dir="${CODECOMPLETE_CACHE:-$HOME/.cache/codecomplete}"
work_dir="${1:-$cache_dir/llama-server}"
pip_cmd="${PIP:-pip}"
jobs="${JOBS:-$(nproc)}"
spec="llama-cpp-python"
if [[ -n "${LLAMA_CPP_PYTHON_VERSION:-}" ]]; then spec="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"; fi

mkdir -p "$work_dir/sdist"
if ! ls "$work_dir"/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    echo "downloading the $spec sdist into $work_dir/sdist" >&2
    $pip_cmd download --no-deps --no-binary :all: -d "$work_dir/sdist" "$spec" >&2
fi
sdist="$(ls -t "$work_dir"/sdist/llama_cpp_python-*.tar.gz | head -n 1)"
version="$(basename "$sdist" .tar.gz)"
src_dir="$work_dir/$version"
if [[ ! -d "$src_dir/vendor/llama.cpp" ]]; then
    echo "unpacking $sdist" >&2
    tar -xzf "$sdist" -C "$work_dir"
fi

build_dir="$src_dir/build-server"
# LLAMA_CURL=OFF: the benchmark hands llama-server a local file; no downloads from it.
nice cmake -S "$src_dir/vendor/llama.cpp" -B "$build_dir" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >&2
nice cmake --build "$build_dir" --target llama-server -j "$jobs" >&2

binary="$build_dir/bin/llama-server"
"$binary" --version >&2 || true
ln -sf "$binary" "$work_dir/llama-server"
echo "$work_dir/llama-server"
