#!/usr/bin/env bash
# Runs the example as torchrun would: WORLD_SIZE (default 2) processes of
# the binary on loopback (../launch_ranks.sh). $1: the build folder.
set -euo pipefail
exec "$(dirname "$0")/../launch_ranks.sh" "${WORLD_SIZE:-2}" "${1:-build}/train_distributed"
