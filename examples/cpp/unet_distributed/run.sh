#!/usr/bin/env bash
# Runs the example as torchrun would: 2 processes of the binary on loopback,
# with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. $1: the build folder.
set -euo pipefail
bin=${1:-build}/unet_distributed
world=${WORLD_SIZE:-2}
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null \
       || echo $((20000 + RANDOM % 30000)))
pids=()
for ((rank = 0; rank < world; rank++)); do
  RANK=$rank WORLD_SIZE=$world LOCAL_RANK=$rank MASTER_ADDR=127.0.0.1 \
    MASTER_PORT=$port OMP_NUM_THREADS=1 timeout 120 "$bin" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
exit $status
