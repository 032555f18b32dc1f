#!/usr/bin/env bash
# Runs the program ($1: its build folder, where it writes its files), then,
# when PYTHON names an interpreter with torch, reads them in Python.
set -euo pipefail
dir=$(cd "$(dirname "$0")" && pwd)
out=${1:-build}
"$out/cxx17_consumer" "$out"
if [ -n "${PYTHON:-}" ]; then
  "$PYTHON" "$dir/check_state.py" "$out"
fi
