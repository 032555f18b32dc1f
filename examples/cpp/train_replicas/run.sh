#!/usr/bin/env bash
# Runs the example as torchrun would (../launch_ranks.sh): WORLD_SIZE
# processes of the binary on loopback. $1: the build folder; $2: the stages
# K, with WORLD_SIZE processes (R = WORLD_SIZE / K). Without $2: 2 x 2,
# 3 x 1 and 1 x 3 in turn.
set -euo pipefail
if [ $# -lt 2 ]; then
  WORLD_SIZE=4 "$0" "${1:-build}" 2
  WORLD_SIZE=3 "$0" "${1:-build}" 3
  WORLD_SIZE=3 "$0" "${1:-build}" 1
  exit 0
fi
exec "$(dirname "$0")/../launch_ranks.sh" "${WORLD_SIZE:-4}" "${1:-build}/train_replicas" "$2"
