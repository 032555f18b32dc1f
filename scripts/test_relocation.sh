#!/usr/bin/env bash
# The installed C++ package is relocatable: copied to another folder, with
# torch reached through another path (a tree of links to the same torch, as
# a second install of the same version would be) and through
# CMAKE_PREFIX_PATH only, the C++17 consumer (examples/cpp/cxx17_consumer)
# still configures, builds and runs.
#   scripts/test_relocation.sh <pipegear prefix> <torch cmake prefix>
# Fails when the package's CMake files name a path of the machine that built
# it (the source or build folder, the torch it was built against), or when
# the consumer's link line reaches the original torch.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=$(realpath "$1"); torch_cmake=$(realpath "$2")
torch_root=$(realpath "$torch_cmake/../..")   # .../site-packages/torch
work=$(mktemp -d "${TMPDIR:-/tmp}/pipegear-relocation.XXXXXX")
trap 'rm -rf "$work"' EXIT

# 1. No absolute path of this build in what the package exports.
config=$(find "$prefix" -name pipegearConfig.cmake | head -1)
if [ -z "$config" ]; then
  echo "test_relocation: no pipegearConfig.cmake under $prefix" >&2
  exit 1
fi
cmake_dir=$(dirname "$config")
for path in "$PWD" "$torch_root" "$(realpath "$torch_root/..")"; do
  if grep -rlF "$path" "$cmake_dir"; then
    echo "test_relocation: $cmake_dir names $path (above)" >&2
    exit 1
  fi
done

# 2. The package and the example elsewhere; torch as a tree of links.
cp -a "$prefix" "$work/pipegear"
cp -a examples/cpp/cxx17_consumer "$work/src"
mkdir "$work/torch"
cp -rs "$torch_root/include" "$torch_root/lib" "$torch_root/share" "$work/torch/"
# Output in a log, shown when it fails (torch's CMake warns of kineto).
if ! cmake -S "$work/src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
    -DCMAKE_PREFIX_PATH="$work/pipegear;$work/torch/share/cmake" \
    >"$work/configure.log" 2>&1; then
  cat "$work/configure.log" >&2
  exit 1
fi
if grep -F "$torch_root" "$work/build/build.ninja" >/dev/null; then
  echo "test_relocation: the consumer's build reaches $torch_root:" >&2
  grep -oF "$torch_root[^ ]*" "$work/build/build.ninja" | sort -u >&2
  exit 1
fi
# The program only: the header check (every_header_cxx17) ran in make consumer.
cmake --build "$work/build" --target cxx17_consumer >/dev/null
"$work/build/cxx17_consumer" "$work/build" >/dev/null

# 3. A torch of another minor version is refused by the package, naming both
# versions (a stand-in config: the check needs only its version).
mkdir -p "$work/other-torch/Torch"
echo 'add_library(torch INTERFACE IMPORTED)' > "$work/other-torch/Torch/TorchConfig.cmake"
printf 'set(PACKAGE_VERSION "1.0.0")\nset(PACKAGE_VERSION_COMPATIBLE TRUE)\n' \
  > "$work/other-torch/Torch/TorchConfigVersion.cmake"
if cmake -S "$work/src" -B "$work/build-other" -G Ninja \
    -DCMAKE_PREFIX_PATH="$work/pipegear;$work/other-torch" \
    >"$work/other.log" 2>&1; then
  echo "test_relocation: a torch 1.0.0 was accepted" >&2
  exit 1
fi
if ! tr -s ' \n' ' ' <"$work/other.log" | grep -q "the torch found is 1.0.0"; then
  cat "$work/other.log" >&2
  exit 1
fi
echo "relocation: the package copied to another folder, torch through" \
     "CMAKE_PREFIX_PATH at another path: configured, built (C++17) and ran;" \
     "a torch of another minor version refused"
