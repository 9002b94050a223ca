#!/usr/bin/env bash
# N local processes that act as N hosts (CPU devices), to exercise the multi-host paths:
#   launch/local_multiprocess.sh 2 configs/siglip_shapes.py:tiny /tmp/bigvl/mp [--config.k=v]
set -euo pipefail
n=$1 config=$2 workdir=$3
shift 3
port=$((20000 + RANDOM % 20000))
pids=()
for ((i = 0; i < n; i++)); do
  BIGVL_MULTIHOST=1 JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    python -m bigvl.main --config "$config" --workdir "$workdir" "$@" \
    > "$workdir.host$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
tail -n 5 "$workdir.host0.log"
exit $status
