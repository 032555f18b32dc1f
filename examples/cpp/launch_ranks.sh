#!/usr/bin/env bash
# Runs a distributed example as torchrun would: WORLD processes of BIN on
# loopback, each with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
# MASTER_PORT (one intra-op thread, at most 120 s). Usage:
#   launch_ranks.sh WORLD BIN [ARGS...]
# Exits non-zero when any rank does.
set -euo pipefail
world=$1
bin=$2
shift 2
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null \
       || echo $((20000 + RANDOM % 30000)))
pids=()
for ((rank = 0; rank < world; rank++)); do
  RANK=$rank WORLD_SIZE=$world LOCAL_RANK=$rank MASTER_ADDR=127.0.0.1 \
    MASTER_PORT=$port OMP_NUM_THREADS=1 timeout 120 "$bin" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
exit $status
