#!/usr/bin/env bash
# Trains on every host of a Cloud TPU VM pod slice: copies this checkout to all workers and
# installs it, then starts main.py on all of them at once with --distributed
# (jax.distributed.initialize() finds the slice's coordinator and its own process id by itself).
#
#   TPU_NAME=conadv-v4-128 ZONE=us-central2-b PROJECT=my-project \
#   WORKDIR=gs://my-bucket/conadv_r50_32k DATA_DIR=gs://my-bucket/tensorflow_datasets \
#   scripts/launch_tpu_pod.sh           # install, then train
#   scripts/launch_tpu_pod.sh install   # only copy and install the code on every worker
#   scripts/launch_tpu_pod.sh train     # only (re)start training
#
# WORKDIR must be a place every worker sees (a GCS bucket): all hosts write their part of each
# checkpoint there; host 0 alone writes the logs, metrics.jsonl and results.json.
# DATA_DIR is the TFDS data dir with imagenet2012 prepared (see README); it is passed as
# TFDS_DATA_DIR, so every host reads its own 1/num_hosts of the data from there.
# Preemption: a host that gets SIGTERM makes all hosts save a checkpoint at one agreed step and
# exit with status 0. Running `train` again (the same command) resumes from there exactly.
set -euo pipefail

TPU_NAME="${TPU_NAME:?set TPU_NAME to the TPU VM (pod slice) name}"
ZONE="${ZONE:?set ZONE, e.g. us-central2-b}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
CONFIG="${CONFIG:-configs/imagenet_resnet50.py:conadv_32k}"
WORKDIR="${WORKDIR:?set WORKDIR, e.g. gs://BUCKET/conadv_r50_32k}"
DATA_DIR="${DATA_DIR:-}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"  # More main.py flags, e.g. "--config.staleness=2".
REMOTE_DIR="${REMOTE_DIR:-conadv_jax}"  # Under $HOME on every worker.
PYTHON="${PYTHON:-python3.11}"  # The package needs Python >= 3.11.
JAX_SPEC="${JAX_SPEC:-jax[tpu]>=0.6,<0.13}"
DETACH="${DETACH:-0}"  # 1: start in the background (nohup) and return; logs in ~/conadv_train.log.

REPO="$(cd "$(dirname "$0")/.." && pwd)"

on_all_workers() {  # on_all_workers COMMAND: runs COMMAND with bash on every worker at once.
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all \
    --command="bash -c $(printf '%q' "$1")"
}

install() {
  local tarball
  tarball="$(mktemp -d)/conadv_jax.tar.gz"
  tar -czf "$tarball" -C "$REPO" --exclude=.venv --exclude=.git --exclude=__pycache__ \
    --exclude='*.egg-info' .
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:conadv_jax.tar.gz" --zone="$ZONE" \
    --project="$PROJECT" --worker=all
  on_all_workers "set -euo pipefail
    if ! command -v $PYTHON >/dev/null; then
      sudo apt-get update -qq
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PYTHON $PYTHON-venv
    fi
    mkdir -p ~/$REMOTE_DIR
    tar -xzf ~/conadv_jax.tar.gz -C ~/$REMOTE_DIR
    cd ~/$REMOTE_DIR
    [ -d .venv ] || $PYTHON -m venv .venv
    . .venv/bin/activate
    pip install -q --upgrade pip
    pip install -q -e . $(printf '%q' "$JAX_SPEC")
    python -c 'import conadv_jax, jax; print(\"worker ready: jax\", jax.__version__)'"
}

train() {
  local run
  run="cd ~/$REMOTE_DIR && . .venv/bin/activate && "
  run+="${DATA_DIR:+TFDS_DATA_DIR=$(printf '%q' "$DATA_DIR") }"
  run+="python main.py --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
  run+=" --distributed $EXTRA_FLAGS"
  if [ "$DETACH" = 1 ]; then
    # setsid + nohup: training outlives this ssh session.
    on_all_workers "setsid nohup bash -c $(printf '%q' "$run") > ~/conadv_train.log 2>&1 \
      < /dev/null &
      echo \"started on \$(hostname); log: ~/conadv_train.log\""
  else
    # Every worker's output, interleaved; host 0's holds the training log.
    on_all_workers "set -o pipefail; $run 2>&1 | tee ~/conadv_train.log"
  fi
}

case "${1:-all}" in
  install) install ;;
  train) train ;;
  all) install && train ;;
  *) echo "usage: $0 [install|train|all]" >&2; exit 64 ;;
esac
