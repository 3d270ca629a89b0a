#!/usr/bin/env bash
# Every GPU measurement of the project in one call, figures as JSON lines under $OUT.
#
#   OUT=runs/gpu_check bash experiments/gpu_check.sh           # on a GPU machine
#   OUT=/tmp/gc TINY=1 bash experiments/gpu_check.sh           # CPU dry run, tiny shapes
#
# 1. the card, driver, library versions and XLA_FLAGS; a bf16 matrix-product ceiling;
# 2. experiments/bench_train_step.py, ResNet-50 bf16, 256 images per device: BN groups
#    of 32 (profiled: top XLA ops, FLOPs, TFLOP/s), BN over the device batch (256), and
#    groups of 32 with launch/xla_gpu_flags.sh sourced;
# 3. the baseline, a minimal jit ResNet-50 step (BASELINE=path/to/own_resnet50.py), in
#    the same call: compare ratios, not figures from different calls or cards;
# 4. with the time left (BUDGET_S in all), the GPU mode of the Fashion-MNIST study
#    (experiments/small_scale.py --mode gpu, FMNIST=folder of the four .gz files); its
#    results folder (records, tables, plots) comes back as $OUT/small_scale_gpu.tgz.
# Optional: WHEELS=folder of wheels installed first (e.g. the orbax version we test with);
# SECTIONS=comma list of machine,bench,baseline,profile,study (default all but profile):
# "profile" traces groups of 32 and of 256 with XLA's command buffers off, so that the
# trace names every op instead of one CUDA graph per stretch of them.
SECTIONS=${SECTIONS:-machine,bench,baseline,study}
on() { [[ ",$SECTIONS," == *",$1,"* ]]; }
set -u
OUT=${OUT:?set OUT to a folder for the figures}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-540}
BASELINE=${BASELINE:-.gpu/own_resnet50.py}
FMNIST=${FMNIST:-.gpu/fashion-mnist}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/lsgd_jax_cache}
LOG="$OUT/gpu_check.log"
JSON="$OUT/bench.jsonl"
exec > >(tee -a "$LOG") 2>&1

left() { echo $((BUDGET_S - SECONDS)); }
section() { echo; echo "=== $* (t=${SECONDS}s, $(left)s left) ==="; }

if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if [ -n "${TINY:-}" ]; then  # CPU dry run of every section
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=1"
  BENCH="--model resnet8 --image-size 28 --channels 1 --num-classes 10 --dtype float32
         --batch-per-device 8 --steps 2 --warmup-steps 1 --repeats 2"
  G=4; BIG=8; PROFILE=2; BASE_ARGS="2 1 0"; MATMUL=512; STUDY_EXTRA="--mode quick"
else
  BENCH="--model resnet50 --dtype bfloat16 --batch-per-device 256 --steps 30
         --warmup-steps 10 --repeats 3"
  G=32; BIG=256; PROFILE=10; BASE_ARGS="256 40 0,32"; MATMUL=8192; STUDY_EXTRA="--mode gpu"
fi

if on machine; then
section "machine"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
  --format=csv 2>/dev/null || echo "(no nvidia-smi)"
$PY - <<'EOF'
import importlib, json, os, platform
v = {m: importlib.import_module(m).__version__ for m in ("jax", "jaxlib", "flax", "optax", "numpy")}
import orbax.checkpoint as ocp
v["orbax"] = getattr(ocp, "__version__", "?")
import jax
v.update(python=platform.python_version(), devices=[d.device_kind for d in jax.devices()],
         XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))
print(json.dumps(v))
EOF

# Convolution autotuning results shared between the variants' processes (the convolutions
# are the same in each): compile time only. Kept out if this jaxlib does not know the flag.
AUTOTUNE="--xla_gpu_per_fusion_autotune_cache_dir=/tmp/lsgd_xla_autotune"
if XLA_FLAGS="${XLA_FLAGS:-} $AUTOTUNE" $PY -c "import jax; jax.devices()" >/dev/null 2>&1; then
  export XLA_FLAGS="${XLA_FLAGS:-} $AUTOTUNE"
  echo "XLA_FLAGS for every variant: $XLA_FLAGS"
fi

section "bf16 matrix product ceiling (random data)"
MATMUL=$MATMUL $PY - <<'EOF' | tee -a "$JSON"
import json, os, time, jax, jax.numpy as jnp
n = int(os.environ["MATMUL"])
k1, k2 = jax.random.split(jax.random.key(0))
a = jax.random.normal(k1, (n, n), jnp.bfloat16); b = jax.random.normal(k2, (n, n), jnp.bfloat16)
f = jax.jit(lambda a, b: a @ b)
f(a, b).block_until_ready()
reps = 20
t0 = time.perf_counter()
for _ in range(reps):
    c = f(a, b)
c.block_until_ready()
s = (time.perf_counter() - t0) / reps
print(json.dumps({"label": "matmul_bf16", "n": n, "s": s, "tflops_per_s": 2 * n**3 / s / 1e12,
                  "device": jax.devices()[0].device_kind}))
EOF
fi

bench() {  # label, then extra flags
  local label=$1; shift
  section "train step: $label"
  $PY experiments/bench_train_step.py $BENCH --json "$JSON" --label "$label" "$@" \
    || echo "FAILED: $label"
}
if on bench; then
bench "groups_of_${G}" --bn-group-size $G --profile-steps $PROFILE --top-ops 15
fi

if on baseline; then
section "baseline: own_resnet50.py $BASE_ARGS"
if [ -f "$BASELINE" ]; then
  if [ -n "${TINY:-}" ]; then
    echo "(TINY: baseline skipped, its ResNet-50 at 224x224 is too slow on a CPU)"
  else
    $PY "$BASELINE" $BASE_ARGS | tee -a "$JSON" || echo "FAILED: baseline"
  fi
else
  echo "FAILED: no baseline at $BASELINE"
fi
fi

if on bench; then
bench "groups_of_${BIG}_whole_device_batch" --bn-group-size $BIG
( . launch/xla_gpu_flags.sh && bench "groups_of_${G}_xla_gpu_flags" --bn-group-size $G )
fi

if on profile; then
section "profile: groups of $G and of $BIG, command buffers off"
NOCB="--xla_gpu_enable_command_buffer="
if XLA_FLAGS="${XLA_FLAGS:-} $NOCB" $PY -c "import jax; jax.devices()" >/dev/null 2>&1; then
  PROFILE_FLAGS="$NOCB"
else
  PROFILE_FLAGS=""; echo "(this jaxlib does not know $NOCB: profiling with command buffers)"
fi
for g in $G $BIG; do
  ( export XLA_FLAGS="${XLA_FLAGS:-} $PROFILE_FLAGS"
    bench "groups_of_${g}_profiled_no_command_buffers" --bn-group-size $g \
      --profile-steps $PROFILE --top-ops 25 )
done
fi

section "summary"
$PY - "$JSON" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
base = {r["system"]: r["img_per_s"] for r in rows if r.get("system", "").startswith("own-")}
ghost = next((v for k, v in base.items() if "ghost" in k), None)
for r in rows:
    if "img_per_s" not in r:
        continue
    name = r.get("label") or r["system"]
    ratio = f"{r['img_per_s'] / ghost:.3f}x baseline ghost32" if ghost else ""
    print(f"{name:45s} {r['img_per_s']:9,.0f} img/s  {ratio}")
EOF

if on study; then
section "Fashion-MNIST study, GPU mode"
limit=$(( $(left) - 45 ))
if [ "$limit" -gt 60 ]; then
  $PY experiments/small_scale.py $STUDY_EXTRA --fmnist-dir "$FMNIST" \
    --out /tmp/small_scale_gpu --results experiments/results/small_scale_gpu \
    --time-limit "$limit" || echo "FAILED: study"
  # The committed records travel with the call (finished runs are skipped); the new ones
  # come back here: untar over experiments/results/small_scale_gpu.
  tar -C experiments/results/small_scale_gpu -czf "$OUT/small_scale_gpu.tgz" . \
    && tar -C /tmp/small_scale_gpu -czf "$OUT/small_scale_gpu_logs.tgz" logs
else
  echo "skipped: only $(left) s left"
fi
fi

section "done"
