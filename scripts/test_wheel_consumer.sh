#!/usr/bin/env bash
# The wheel serves LibTorch programs too: `pip wheel --no-build-isolation`
# builds it against the development venv's torch (the CMake build in
# build/setup is reused), a fresh virtual environment gets torch==2.13.0 and
# the wheel, and examples/cpp/cxx17_consumer is configured, built and run
# against the pip-installed package, found through pipegear.cmake_prefix_path
# (torch through torch.utils.cmake_prefix_path, then once more without it:
# the config falls back to the torch installed beside pipegear).
#   scripts/test_wheel_consumer.sh        (PYTHON: the build interpreter,
#                                          default .venv/bin/python)
# Takes minutes: the wheel's CMake build (a few, the first time), a venv
# with torch (about one), the consumer (about one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
work=$(mktemp -d "${TMPDIR:-/tmp}/pipegear-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
step() { echo "== $* ($SECONDS s)"; }
# Runs a command with its output in a log, shown only when it fails (pip's
# notes on the local indexes, torch's CMake warnings).
quiet() {
  local log="$work/$1.log"; shift
  "$@" >"$log" 2>&1 || { cat "$log" >&2; return 1; }
}
# The fresh venv has no numpy; torch says so at import.
export PYTHONWARNINGS="ignore:Failed to initialize NumPy"

step "wheel"
quiet wheel "$PY" -m pip wheel --no-build-isolation --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/pipegear-*.whl)
"$PY" - "$wheel" <<'PYCHECK'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
libs = [n for n in names if "libpipegear" in n]
assert libs == ["pipegear/lib/libpipegear.so.0"], libs
for need in ["pipegear/include/pipegear/pipegear.h",
             "pipegear/share/cmake/pipegear/pipegearConfig.cmake",
             "pipegear/share/cmake/pipegear/pipegearTargets.cmake"]:
    assert need in names, need
assert not any("/detail/" in n for n in names), "detail/ headers in the wheel"
print(f"{sys.argv[1].rsplit('/', 1)[-1]}: one libpipegear, headers and "
      f"CMake files ({len(names)} files)")
PYCHECK

step "fresh venv: torch==2.13.0 and the wheel"
python3 -m venv "$work/venv"
# Pinned: a bare `torch` would make pip resolve a multi-GB CUDA build.
quiet pip-torch "$work/venv/bin/pip" install torch==2.13.0
quiet pip-wheel "$work/venv/bin/pip" install --no-deps "$wheel"
vpy="$work/venv/bin/python"
(cd "$work" && "$vpy" -c '
import pipegear, torch
pipe = pipegear.GPipe(torch.nn.Sequential(torch.nn.Linear(2, 2)), [1], chunks=2)
assert pipe(torch.randn(4, 2)).shape == (4, 2)
print("import pipegear:", pipegear.__file__)')
pg_prefix=$(cd "$work" && "$vpy" -c 'import pipegear; print(pipegear.cmake_prefix_path)')
torch_prefix=$(cd "$work" && "$vpy" -c 'import torch; print(torch.utils.cmake_prefix_path)')

step "C++17 consumer against the pip-installed package"
quiet configure cmake -S examples/cpp/cxx17_consumer -B "$work/consumer" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
  -DCMAKE_PREFIX_PATH="$pg_prefix;$torch_prefix"
quiet build cmake --build "$work/consumer"
"$work/consumer/cxx17_consumer" "$work/consumer" | tail -1
(cd "$work" && "$vpy" "$OLDPWD/examples/cpp/cxx17_consumer/check_state.py" consumer)

step "the same, torch found beside pipegear (CMAKE_PREFIX_PATH: pipegear's only)"
quiet configure2 cmake -S examples/cpp/cxx17_consumer -B "$work/consumer2" \
  -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$pg_prefix"
found=$(sed -n 's/^Torch_DIR:PATH=//p' "$work/consumer2/CMakeCache.txt")
if [ "$(realpath "$found")" != "$(realpath "$torch_prefix/Torch")" ]; then
  echo "test_wheel_consumer: found torch at '$found', not the venv's" >&2
  exit 1
fi

step "done: the wheel serves Python and C++"
