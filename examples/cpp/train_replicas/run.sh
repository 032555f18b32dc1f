#!/usr/bin/env bash
# Runs the example as torchrun would: processes of the binary on loopback,
# with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. $1: the build folder;
# $2: the stages K, with WORLD_SIZE processes (R = WORLD_SIZE / K). Without
# $2: 2 x 2, 3 x 1 and 1 x 3 in turn.
set -euo pipefail
bin=${1:-build}/train_replicas
if [ $# -lt 2 ]; then
  WORLD_SIZE=4 "$0" "${1:-build}" 2
  WORLD_SIZE=3 "$0" "${1:-build}" 3
  WORLD_SIZE=3 "$0" "${1:-build}" 1
  exit 0
fi
world=${WORLD_SIZE:-4}
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null \
       || echo $((20000 + RANDOM % 30000)))
pids=()
for ((rank = 0; rank < world; rank++)); do
  RANK=$rank WORLD_SIZE=$world LOCAL_RANK=$rank MASTER_ADDR=127.0.0.1 \
    MASTER_PORT=$port OMP_NUM_THREADS=1 timeout 120 "$bin" "$2" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
exit $status
