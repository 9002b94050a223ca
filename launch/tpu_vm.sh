#!/usr/bin/env bash
# Run a bigvl experiment on every host of a Cloud TPU VM pod slice.
#
#   launch/tpu_vm.sh NAME ZONE configs/siglip_shapes.py gs://bucket/workdir [--config.k=v ...]
#
# Copies this checkout to each host, installs it with jax[tpu], and starts the same command
# on all hosts; jax.distributed.initialize() (BIGVL_MULTIHOST=1) finds the peers itself.
# Re-running the same line resumes from the workdir's last checkpoint.
set -euo pipefail
name=$1 zone=$2 config=$3 workdir=$4
shift 4
here=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$here" --exclude .git -czf /tmp/bigvl_src.tgz .
gcloud compute tpus tpu-vm scp /tmp/bigvl_src.tgz "$name":/tmp/ --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e; mkdir -p ~/bigvl && tar -C ~/bigvl -xzf /tmp/bigvl_src.tgz && cd ~/bigvl &&
  pip install -q -e '.[tpu]' &&
  BIGVL_MULTIHOST=1 nohup python -m bigvl.main --config $config --workdir $workdir $* \
    > ~/bigvl.log 2>&1 &"
echo "started on $name; logs: gcloud compute tpus tpu-vm ssh $name --zone $zone --worker=0 --command 'tail -f ~/bigvl.log'"
