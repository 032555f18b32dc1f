#!/usr/bin/env bash
# Installs everything pipegear needs, idempotently: Debian packages (catch2,
# ccache, ninja) when missing and running as root, and a virtual environment
# .venv with the CPU build of torch==2.13.0, the Python tools and the optional
# model libraries (transformers, for pipegear.models). A second run
# with nothing to do takes about a second (a stamp records the requirements).
set -euo pipefail
cd "$(dirname "$0")/.."

need_deb=()
[ -f /usr/include/catch2/catch.hpp ] || need_deb+=(catch2)
command -v ccache >/dev/null 2>&1 || need_deb+=(ccache)
command -v ninja >/dev/null 2>&1 || need_deb+=(ninja-build)
command -v cmake >/dev/null 2>&1 || need_deb+=(cmake)
if [ ${#need_deb[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup_env: installing ${need_deb[*]} from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_deb[@]}" >/dev/null
  else
    echo "setup_env: missing ${need_deb[*]}; install them (not root, so not done here)" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
stamp=.venv/.pipegear-requirements
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! cmp -s requirements-dev.txt "$stamp" 2>/dev/null; then
  # torch is pinned: a bare `torch` would pull a multi-GB CUDA build.
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
  cp requirements-dev.txt "$stamp"
fi
# Development import path: python/ on sys.path (what `pip install -e .` would
# give, without re-running the CMake build through setuptools).
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/python" > "$site/pipegear-dev.pth"
