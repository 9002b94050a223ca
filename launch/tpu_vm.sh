#!/usr/bin/env bash
# Cloud TPU VM (one host or a pod slice): create it, install this checkout on every worker, run
# the same `python3 -m bigvl.main` on all of them (BIGVL_MULTIHOST=1: jax.distributed finds the
# peers itself), stream worker 0's log, and delete the VM on request.
#
#   launch/tpu_vm.sh run [options] NAME CONFIG WORKDIR [bigvl.main flags...]
#   launch/tpu_vm.sh logs   --zone ZONE [--project P] NAME    # re-attach to worker 0's log
#   launch/tpu_vm.sh delete --zone ZONE [--project P] [--queued] NAME
#
#   launch/tpu_vm.sh run --zone us-central2-b --accelerator-type v4-32 --delete \
#     siglip-v4 configs/siglip_shapes.py gs://my-bucket/siglip --config.input.batch_size=4096
#
# run options:
#   --zone ZONE              (required)
#   --accelerator-type TYPE  e.g. v4-32, v5litepod-16 (required unless --no-create)
#   --version RUNTIME        TPU software version (default by type: tpu-ubuntu2204-base for
#                            v2-v4, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p,
#                            v2-alpha-tpuv6e for v6e)
#   --queued                 ask through `gcloud compute tpus queued-resources create` (waits
#                            in the queue until capacity is there) instead of creating directly
#   --spot                   a Spot TPU (preemptible; bigvl checkpoints on SIGTERM and a rerun
#                            with --no-create, or a fresh VM, resumes from WORKDIR)
#   --no-create              use the existing VM NAME (a rerun resumes from WORKDIR)
#   --delete                 delete the VM (and its queued resource) when the run has ended
#   --project P              passed to every gcloud command
#   --dry-run                print every command (one per line) instead of running it
# WORKDIR must be visible to every worker (a gs:// bucket on a pod slice: every worker writes
# its checkpoint shards there). ~/bigvl on each worker is replaced by this checkout; the run
# logs to ~/bigvl.log and writes its exit status to ~/bigvl.rc on every worker. The script
# exits with worker 0's status; interrupting the log stream leaves the run going (`logs`
# re-attaches, `delete` removes the VM).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
USAGE="usage: launch/tpu_vm.sh run [--dry-run] --zone ZONE [--accelerator-type TYPE] [--version RUNTIME]
                         [--queued] [--spot] [--no-create] [--delete] [--project P]
                         NAME CONFIG WORKDIR [bigvl.main flags...]
       launch/tpu_vm.sh logs [--dry-run] --zone ZONE [--project P] NAME
       launch/tpu_vm.sh delete [--dry-run] --zone ZONE [--project P] [--queued] NAME"
POLL_SECONDS=${BIGVL_TPU_POLL_SECONDS:-30}
REMOTE_TGZ=/tmp/bigvl-src.tgz

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
[[ $# -ge 1 ]] || usage_error "need a command: run, logs or delete"
action=$1
shift
case $action in
  run|logs|delete) ;;
  -h|--help) echo "$USAGE"; exit 0 ;;
  *) usage_error "unknown command '$action' (run, logs or delete)" ;;
esac

zone="" project="" accel="" version="" queued=0 spot=0 create=1 delete=0
while [[ $# -gt 0 && $1 == --* ]]; do
  opt=$1
  case $action:$opt in
    *:--dry-run) DRY_RUN=1; shift ;;
    *:--zone) need_value "$@"; zone=$2; shift 2 ;;
    *:--project) need_value "$@"; project=$2; shift 2 ;;
    run:--accelerator-type) need_value "$@"; accel=$2; shift 2 ;;
    run:--version) need_value "$@"; version=$2; shift 2 ;;
    run:--queued|delete:--queued) queued=1; shift ;;
    run:--spot) spot=1; shift ;;
    run:--no-create) create=0; shift ;;
    run:--delete) delete=1; shift ;;
    *:-h|*:--help) echo "$USAGE"; exit 0 ;;
    *) usage_error "unknown option $opt for '$action'" ;;
  esac
done
[[ -n $zone ]] || usage_error "--zone is required"
[[ $# -ge 1 ]] || usage_error "need the TPU VM NAME"
name=$1
shift
if [[ $action == run ]]; then
  [[ $# -ge 2 ]] || usage_error "run needs NAME, CONFIG and WORKDIR"
  config=$1 workdir=$2
  shift 2
  if ((create)); then
    [[ -n $accel ]] || usage_error "--accelerator-type is required to create the VM (or --no-create)"
  elif ((queued || spot)) || [[ -n $accel || -n $version ]]; then
    usage_error "--no-create uses an existing VM: --accelerator-type, --version, --queued" \
                "and --spot do not apply"
  fi
  if [[ -z $version ]]; then
    case $accel in
      v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
      v5p-*) version=v2-alpha-tpuv5 ;;
      v6e-*) version=v2-alpha-tpuv6e ;;
      *) version=tpu-ubuntu2204-base ;;
    esac
  fi
elif [[ $# -gt 0 ]]; then
  usage_error "unexpected arguments after NAME: $*"
fi

where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")
tpus=(gcloud compute tpus)

# Polls the command "${@:2}" every POLL_SECONDS until it prints $1; a FAILED or SUSPENDED
# state stops the script. With --dry-run, prints the command once.
wait_for() {
  local want=$1 state
  shift
  if ((DRY_RUN)); then
    echo "$(quote_words "$@")  # every ${POLL_SECONDS}s until it prints $want"
    return
  fi
  while true; do
    state=$("$@")
    [[ $state == "$want" ]] && return
    case $state in
      FAILED|SUSPENDED|SUSPENDING) echo "tpu_vm.sh: $name is $state" >&2; exit 1 ;;
    esac
    echo "tpu_vm.sh: $name is ${state:-not there yet}; waiting for $want" >&2
    sleep "$POLL_SECONDS"
  done
}

# Worker 0's log from the start until the run writes its exit status; exits with that status.
stream_log() {
  run "${tpus[@]}" tpu-vm ssh "$name" "${where[@]}" --worker=0 --command="tail -n +1 -F ~/bigvl.log & while [ ! -e ~/bigvl.rc ]; do sleep 5; done; sleep 2; kill \$!; exit \$(cat ~/bigvl.rc)"
}

delete_vm() {
  if ((queued)); then
    run "${tpus[@]}" queued-resources delete "$name" "${where[@]}" --force --quiet
  else
    run "${tpus[@]}" tpu-vm delete "$name" "${where[@]}" --quiet
  fi
}

case $action in
  delete) delete_vm; exit 0 ;;
  logs) stream_log; exit 0 ;;
esac

extra=()
((spot)) && extra+=(--spot)
if ((create && queued)); then
  run "${tpus[@]}" queued-resources create "$name" --node-id="$name" "${where[@]}" \
    --accelerator-type="$accel" --runtime-version="$version" "${extra[@]}"
  wait_for ACTIVE "${tpus[@]}" queued-resources describe "$name" "${where[@]}" \
    --format='value(state.state)'
elif ((create)); then
  run "${tpus[@]}" tpu-vm create "$name" "${where[@]}" --accelerator-type="$accel" \
    --version="$version" "${extra[@]}"
fi
wait_for READY "${tpus[@]}" tpu-vm describe "$name" "${where[@]}" --format='value(state)'

# This checkout (without VCS data and build leftovers) to every worker, installed with jax[tpu].
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tgz=${TMPDIR:-/tmp}/bigvl-src-$name.tgz
run tar -czf "$tgz" --exclude-vcs --exclude=__pycache__ --exclude='*.egg-info' \
  --exclude=.venv --exclude=.pytest_cache --exclude=.ruff_cache -C "$repo" .
run "${tpus[@]}" tpu-vm scp "$tgz" "$name:$REMOTE_TGZ" "${where[@]}" --worker=all
run "${tpus[@]}" tpu-vm ssh "$name" "${where[@]}" --worker=all --command="set -e; rm -rf ~/bigvl; mkdir -p ~/bigvl; tar -xzf $REMOTE_TGZ -C ~/bigvl; cd ~/bigvl; python3 -m pip install -q -e \".[tpu]\""

# The same command on every worker, detached from the ssh session (it survives a dropped
# connection); its status goes to ~/bigvl.rc when it ends.
main_cmd=$(quote_words python3 -m bigvl.main --config "$config" --workdir "$workdir" "$@")
run "${tpus[@]}" tpu-vm ssh "$name" "${where[@]}" --worker=all --command="cd ~/bigvl && rm -f ~/bigvl.rc && { trap \"\" HUP; BIGVL_MULTIHOST=1 $main_cmd > ~/bigvl.log 2>&1 < /dev/null; echo \$? > ~/bigvl.rc; } > /dev/null 2>&1 &"

status=0
stream_log || status=$?
((delete)) && delete_vm
exit $status
