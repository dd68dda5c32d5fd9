#!/bin/bash
# ConAdv step and task timings on one accelerator, each with the command that made it.
#
# Needs jax (with the accelerator's plugin), flax, optax and ml_collections: the benchmarks import
# the method part only, so a machine without TensorFlow, TFDS or clu runs them. Where
# ml_collections is missing, put it (pure Python) in .gpu_site/ (git-ignored); it is added to
# PYTHONPATH below.
#
#   COMMIT=$(git rev-parse --short HEAD) BUDGET=500 MEMORY=1 bash scripts/benchmark_gpu.sh
#
# Results go to $OUT (default /tmp/gpu_bench_out).
#
# Stages, most valuable first; each is skipped when the budget left is too small for it:
#   0  environment + import check (exits 3 at once if anything is missing: cheap to rerun)
#   1  scripts/benchmark_step.py itself: ResNet-50, 224, bf16, batch 4 (the paper's 4 images per
#      core): vanilla, disadv, conadv (shared) ms/step, compile s, XLA memory, device peak
#   2  scripts/benchmark_tasks.py: task A, task B, the vanilla gradient at 4 and 8 rows and the
#      update, each alone, timed + XLA:GPU cost analysis; a measured projection of split on two
#      devices, and the TPU v3 roofline recomputed from XLA:GPU's (fused) bytes
#   3  scripts/benchmark_step.py at batch 64, vanilla and conadv: the compute-bound regime
#   4  (MEMORY=1 only) scripts/memory_report.py for conadv_aa_96k: XLA:GPU's working memory at
#      micro-batches 4 and 8 (docs/performance.md has XLA:CPU's bound only)
# Files back (the tool returns at most 8): env.txt, commands.txt, run.log, bench_b4.json,
# tasks.json, bench_b64.json, memory.json.
set -u
OUT=${OUT:-/tmp/gpu_bench_out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-360}
PY=${PY:-python3}
MODEL_FLAGS=${MODEL_FLAGS:---model=ResNet50 --image_size=224 --num_classes=1000 --dtype=bfloat16}
B_PAPER=${B_PAPER:-4}
TASK_ROWS=${TASK_ROWS:-4,8}
B_BIG=${B_BIG:-64}
export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2
START=$SECONDS
left() { echo $(( BUDGET - (SECONDS - START) )); }
stage() { echo; echo "=== stage $1 at $((SECONDS - START)) s, $(left) s left: $2"; }
# Run a command under timeout, logging the exact command line (the record the issue asks for).
go() {  # go SECONDS LOGNAME cmd...
  local t=$1 name=$2; shift 2
  echo "+ $*" | tee -a "$OUT/commands.txt"
  echo "##### $name: $*" >> "$OUT/run.log"
  timeout -k 10 "$t" "$@" 2>&1 | grep --line-buffered -v "^I0000\|^WARNING: All log messages" \
    | tee -a "$OUT/run.log"
  local rc=${PIPESTATUS[0]}
  echo "rc=$rc ($name, $((SECONDS - START)) s)" | tee -a "$OUT/run.log"
  return $rc
}

stage 0 "environment"
{
  echo "commit: ${COMMIT:-unknown}"; date -u; uname -r
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,utilization.gpu,power.draw --format=csv
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 120 "$PY" - >> "$OUT/env.txt" 2>&1 <<'PYEOF'
import sys, time
t = time.time()
import importlib.util
import jax, jax.numpy as jnp, flax, optax, ml_collections, numpy
spec = importlib.util.spec_from_file_location("bs", "scripts/benchmark_step.py")
bs = importlib.util.module_from_spec(spec); spec.loader.exec_module(bs)
x = jnp.asarray(numpy.random.RandomState(0).rand(1024, 1024), jnp.bfloat16)
float((x @ x).astype(jnp.float32).sum())  # The accelerator computes.
d = jax.devices()[0]
print("python", sys.version.split()[0], "jax", jax.__version__, "jaxlib",
      __import__("jaxlib").__version__, "flax", flax.__version__, "optax", optax.__version__,
      "ml_collections", ml_collections.__version__, "numpy", numpy.__version__)
print("backend", jax.default_backend(), "devices", jax.devices(), "kind", d.device_kind,
      "memory_stats", {k: v for k, v in (d.memory_stats() or {}).items() if "limit" in k})
print(f"imports + first op: {time.time() - t:.1f} s; IMPORT_OK")
PYEOF
tail -4 "$OUT/env.txt"
if ! grep -q IMPORT_OK "$OUT/env.txt"; then
  echo "stage 0 failed: see env.txt above"; exit 3
fi

stage 1 "benchmark_step.py, batch $B_PAPER, vanilla/disadv/conadv"
T1=$(( $(left) - 30 )); [ "$T1" -gt 240 ] && T1=240
if [ "$T1" -gt 60 ]; then
  go "$T1" bench_b${B_PAPER} "$PY" scripts/benchmark_step.py $MODEL_FLAGS \
    --batch_size="$B_PAPER" --methods=vanilla,disadv,conadv --repeats=50 --warmup=5 \
    --json="$OUT/bench_b${B_PAPER}.json"
else echo "skipped: too little time"; fi

stage 2 "gpu_tasks.py, tasks alone at $TASK_ROWS rows"
T2=$(( $(left) - 15 ))
if [ "$T2" -gt 60 ]; then
  go "$T2" tasks "$PY" scripts/benchmark_tasks.py $MODEL_FLAGS \
    --task_rows="$TASK_ROWS" --task_repeats=30 --task_warmup=5 --deadline_s=$(( T2 - 45 )) \
    --roofline_cores=128 --json="$OUT/tasks.json"
else echo "skipped: too little time"; fi

stage 3 "benchmark_step.py, batch $B_BIG, vanilla/conadv"
T3=$(( $(left) - 5 ))
if [ "$T3" -gt 150 ]; then
  go "$T3" bench_b${B_BIG} "$PY" scripts/benchmark_step.py $MODEL_FLAGS \
    --batch_size="$B_BIG" --methods=vanilla,conadv --repeats=20 --warmup=3 \
    --json="$OUT/bench_b${B_BIG}.json"
else echo "skipped: too little time"; fi

stage 4 "memory_report.py conadv_aa_96k (MEMORY=${MEMORY:-0})"
T4=$(( $(left) - 5 ))
if [ "${MEMORY:-0}" = 1 ] && [ "$T4" -gt 120 ]; then
  go "$T4" memory "$PY" scripts/memory_report.py \
    --config=configs/imagenet_resnet50.py:conadv_aa_96k --num_devices=8 --num_hosts=1 \
    --grad_accum_steps=128 --num_devices=1024 --num_hosts=128 --grad_accum_steps=1 \
    --measure_micro_batches=4,8 --json="$OUT/memory.json"
else echo "skipped"; fi

nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> "$OUT/env.txt" 2>&1
echo; echo "=== summary ($((SECONDS - START)) s)"
grep -E "^(ResNet|SmallResNet|MLP)|^method |^(vanilla|disadv|conadv) +[0-9]|^[a-z_]+/[a-z_]+( flops)?: |rows (vanilla|task_a|task_b|update) |_1dev|_2dev|2x_devices|_over_|^rc=|deadline" "$OUT/run.log"
ls -la "$OUT"
