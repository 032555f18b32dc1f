#!/usr/bin/env bash
# Builds every examples/cpp/<name> as its own CMake project against an
# installed pipegear (find_package(pipegear)) and runs it: the check that a
# LibTorch program can consume the package as users will.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=$(realpath "$1"); torch_prefix=$2
for dir in examples/cpp/*/; do
  name=$(basename "$dir")
  out=build/examples/$name
  cmake -S "$dir" -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
    -DCMAKE_PREFIX_PATH="$prefix;$torch_prefix" >/dev/null
  cmake --build "$out" >/dev/null
  echo "== examples/cpp/$name"
  if [ -x "$dir/run.sh" ]; then "$dir/run.sh" "$out"; else "$out/$name"; fi
done
echo "C++ examples: built with find_package(pipegear) and ran"
