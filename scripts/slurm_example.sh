#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU, started by srun on every node.
#
#   sbatch scripts/slurm_example.sh                          # the defaults below
#   sbatch --nodes=8 --export=ALL,CONFIG=configs/imagenet_resnet50.py:conadv_32k \
#     scripts/slurm_example.sh
#
# main.py --distributed calls jax.distributed.initialize(), which reads SLURM's variables
# (SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID): the coordinator is the first
# node, process i is task i and uses GPU number SLURM_LOCALID of its node. So: as many tasks per
# node as GPUs, and every task must see all of its node's GPUs (no --gpus-per-task binding).
#
# WORKDIR must be on a filesystem every node mounts. Process 0 alone writes the logs,
# metrics.jsonl and results.json; every process writes its part of each checkpoint.
# Preemption and time limit: SLURM sends SIGTERM (here also 120 s before the limit); all
# processes save a checkpoint at one agreed step and exit 0. Submitting the same script again
# (or SLURM's requeue after a preemption) resumes from it exactly; to go on past the time limit,
# chain jobs: sbatch --dependency=afterany:JOBID scripts/slurm_example.sh
#
#SBATCH --job-name=conadv
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

REPO="${REPO:-$SLURM_SUBMIT_DIR}"  # A checkout with .venv: pip install -e . 'jax[cuda12]'.
CONFIG="${CONFIG:-configs/imagenet_resnet50.py:conadv_32k}"
WORKDIR="${WORKDIR:-$REPO/runs/${CONFIG//[:\/]/_}}"
DATA_DIR="${DATA_DIR:-}"  # TFDS data dir with imagenet2012 prepared; default: TFDS's own.
EXTRA_FLAGS="${EXTRA_FLAGS:-}"

cd "$REPO"
. .venv/bin/activate
if [ -n "$DATA_DIR" ]; then
  export TFDS_DATA_DIR="$DATA_DIR"
fi
# shellcheck disable=SC2086  # EXTRA_FLAGS is a list of flags.
srun --kill-on-bad-exit=1 python main.py --config="$CONFIG" --workdir="$WORKDIR" --distributed \
  $EXTRA_FLAGS
