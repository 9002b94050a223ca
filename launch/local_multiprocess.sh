#!/usr/bin/env bash
# N local processes that act as N hosts (one CPU device each, gloo collectives), to exercise
# the multi-host paths on one machine: per-host data shards, cross-process collectives,
# checkpoints written by every process, process-0-only logging.
#
#   launch/local_multiprocess.sh [--dry-run] [--port P] N CONFIG WORKDIR [bigvl.main flags...]
#   launch/local_multiprocess.sh 2 configs/siglip_shapes.py:tiny /tmp/bigvl/mp --config.total_steps=20
#
# Process i logs to WORKDIR.host<i>.log; the script waits for all of them, shows the end of
# host 0's log and exits with the last non-zero status (0 if all succeeded). --dry-run prints
# the N commands (one per line) instead of running them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
USAGE="usage: launch/local_multiprocess.sh [--dry-run] [--port P] N CONFIG WORKDIR [bigvl.main flags...]"

DRY_RUN=0
port=""
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --dry-run) DRY_RUN=1; shift ;;
    --port) need_value "$@"; port=$2; shift 2 ;;
    -h|--help) echo "$USAGE"; exit 0 ;;
    *) usage_error "unknown option $1" ;;
  esac
done
[[ $# -ge 3 ]] || usage_error "need N, CONFIG and WORKDIR"
n=$1 config=$2 workdir=$3
shift 3
[[ $n =~ ^[1-9][0-9]*$ ]] || usage_error "N must be a positive integer, got '$n'"
[[ -z $port || $port =~ ^[0-9]+$ ]] || usage_error "--port must be a number, got '$port'"
port=${port:-$((20000 + RANDOM % 20000))}

# Process i: the environment bigvl.parallel.initialize_distributed reads, then bigvl.main
# (the same array is printed by --dry-run and run otherwise).
process_cmd() {
  cmd=(env BIGVL_MULTIHOST=1 JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
       "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$n" "JAX_PROCESS_ID=$1"
       python -m bigvl.main --config "$config" --workdir "$workdir" "${@:2}")
}

[[ $DRY_RUN == 1 ]] || mkdir -p "$(dirname "$workdir")"
pids=()
for ((i = 0; i < n; i++)); do
  process_cmd "$i" "$@"
  log="$workdir.host$i.log"
  if [[ $DRY_RUN == 1 ]]; then
    echo "$(quote_words "${cmd[@]}") > $(quote "$log") 2>&1 &"
  else
    "${cmd[@]}" > "$log" 2>&1 &
    pids+=($!)
  fi
done
[[ $DRY_RUN == 0 ]] || exit 0
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
tail -n 5 "$workdir.host0.log"
exit $status
