#!/usr/bin/env bash
# Every GPU measurement of the project in one call (<= 9 minutes), figures as JSON lines
# under $OUT, a summary table at the end.
#
#   OUT=runs/gpu_check bash experiments/gpu_check.sh           # on a GPU machine
#   OUT=/tmp/gc TINY=1 bash experiments/gpu_check.sh           # CPU dry run, tiny shapes
#
# Files it expects in .gpu/ (git-ignored; copy them in, then send the folder along with
# the working tree, e.g. as a "carry" path of a remote run):
#   mkdir -p .gpu/fashion-mnist
#   cp path/to/own_resnet50.py .gpu/                         # the baseline step
#   cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fashion-mnist/   # the study's data
# (or BASELINE=file, FMNIST=folder).
#
# Sections (SECTIONS=comma list; default machine,levers,baseline,profile,input,folders,study):
#   machine   the card, driver, library versions, XLA_FLAGS; a bf16 matrix-product ceiling;
#   levers    one process of experiments/bench_train_step.py, ResNet-50 bf16, 256 images
#             per device, that compiles today's step (BN groups of 32, the reference),
#             each speed lever alone, all of them, BN over the device batch (256), and
#             times them in interleaved windows; then the reference plus every lever that
#             beat it ("combined") and a second round of all; ~3-4 minutes;
#   baseline  own_resnet50.py 256 40 0,32 (a minimal jit ResNet-50 step) in the same call:
#             compare ratios, not figures from different calls or cards;
#   profile   the fastest variant with BN groups of 32 again, traced with XLA's command
#             buffers off (the trace names every op): top ops, and the trace by kind;
#   input     experiments/bench_input_pipeline.py (1 core and all cores);
#   folders   experiments/end_to_end_folders.py: writes an ImageNet-like JPEG folder on
#             this host (~5,000 photo-like files, ~400x350, ~90 KB; no TensorFlow), trains ResNet-50
#             bf16 on it with decoding workers on all cores for a few hundred steps: end-to-
#             end images/s against the step alone, the input-wait share, the evaluation's
#             images/s, the workers' images per core-second; ~3 minutes;
#   study     with the time left (BUDGET_S in all), the GPU mode of the Fashion-MNIST study
#             (experiments/small_scale.py --mode gpu); finished runs come back as
#             $OUT/small_scale_gpu.tgz (untar over experiments/results/small_scale_gpu);
#   bench     (not by default) the three separate-process steps of the earlier calls.
# Expected on an H200, from the earlier calls' compile times (22 s first, ~12 s after):
# machine 15 s, levers 3-4 min, baseline 50 s, profile 45 s, input 20 s, the study the
# rest (its ~20 missing runs need about 200 s; it stops at the budget and keeps what
# finished). Run it with a 590 s limit for the default BUDGET_S=540.
# Optional: WHEELS=folder of wheels installed first. The defaults of the model change
# only after such a call shows a lever faster.
SECTIONS=${SECTIONS:-machine,levers,baseline,profile,input,folders,study}
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
WINNER="$OUT/winner.args"
exec > >(tee -a "$LOG") 2>&1

left() { echo $((BUDGET_S - SECONDS)); }
section() { echo; echo "=== $* (t=${SECONDS}s, $(left)s left) ==="; }

if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if [ -n "${TINY:-}" ]; then  # CPU dry run of every section
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=1"
  BENCH="--model resnet18 --image-size 32 --num-classes 10 --dtype float32
         --batch-per-device 8 --steps 2 --warmup-steps 1 --repeats 2"
  G=2; BIG=8; PROFILE=2; BASE_ARGS="2 1 0"; MATMUL=512; STUDY_EXTRA="--mode quick"
  STUDY_RESULTS=/tmp/small_scale_quick_results  # never over the committed GPU results
  INPUT_ARGS="--num-images 32 --rounds 1 --skip-tf"
  FOLDERS_ARGS="--tiny"
  SPLIT="--bn-split-rows 24"  # small enough that the tiny shapes reduce in two stages
else
  BENCH="--model resnet50 --dtype bfloat16 --batch-per-device 256 --steps 20
         --warmup-steps 5 --repeats 3"
  G=32; BIG=256; PROFILE=10; BASE_ARGS="256 40 0,32"; MATMUL=8192; STUDY_EXTRA="--mode gpu"
  STUDY_RESULTS=experiments/results/small_scale_gpu
  INPUT_ARGS=""
  FOLDERS_ARGS="--train-files 4096 --val-files 1024 --steps 300"
  SPLIT=""
fi
# The levers (lsgd_jax/models: grouped_bn.py, pooling.py, stem.py; XLA options per
# compile). The first variant is the reference, today's step. Each costs a compile
# (~12 s); left out for time: xla_gpu_experimental_enable_conv_fusion=true (it fuses
# pointwise ops and a reduction to a scalar only, not our BN statistics).
FAST_MIN_MAX="--xla-option xla_gpu_enable_fast_min_max=true"
VARIANTS=(
  "today="
  "bn_split=--bn-impl split $SPLIT"
  "bn_custom_vjp=--bn-impl custom_vjp $SPLIT"
  "pool_masks=--pool-impl masks"
  "stem_pad4=--stem-impl pad4"
  "stem_s2d=--stem-impl s2d"
  "fast_min_max=$FAST_MIN_MAX"
  "all_levers=--bn-impl custom_vjp $SPLIT --pool-impl masks --stem-impl pad4 $FAST_MIN_MAX"
  "today_groups_of_${BIG}=--bn-group-size $BIG"
)

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
         XLA_FLAGS=os.environ.get("XLA_FLAGS", ""), cpu_cores=os.cpu_count())
print(json.dumps(v))
EOF

# Convolution autotuning results shared between the processes (the convolutions are the
# same in each): compile time only. Kept out if this jaxlib does not know the flag.
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

if on levers; then
section "levers: ${#VARIANTS[@]} variants and their combination, interleaved, one process"
args=()
for v in "${VARIANTS[@]}"; do args+=(--variant "$v"); done
# Bounded so that the baseline and the profile keep their ~100 s; if cut, the log
# still holds the screening table.
timeout $(( $(left) - 150 )) $PY experiments/bench_train_step.py $BENCH --bn-group-size $G \
  --json "$JSON" --combine --winner-args "$WINNER" "${args[@]}" || echo "FAILED: levers"
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
bench "groups_of_${G}" --bn-group-size $G --profile-steps $PROFILE --top-ops 15
bench "groups_of_${BIG}_whole_device_batch" --bn-group-size $BIG
( . launch/xla_gpu_flags.sh && bench "groups_of_${G}_xla_gpu_flags" --bn-group-size $G )
fi

if on profile; then
NOCB="--xla_gpu_enable_command_buffer="
if [ -n "${TINY:-}" ]; then
  PROFILE_FLAGS=""
elif XLA_FLAGS="${XLA_FLAGS:-} $NOCB" $PY -c "import jax; jax.devices()" >/dev/null 2>&1; then
  PROFILE_FLAGS="$NOCB"
else
  PROFILE_FLAGS=""; echo "(this jaxlib does not know $NOCB: profiling with command buffers)"
fi
W=$(cat "$WINNER" 2>/dev/null || echo "--bn-group-size $G")
section "profile: the fastest variant with BN groups of $G ($W), command buffers off"
( export XLA_FLAGS="${XLA_FLAGS:-} $PROFILE_FLAGS"
  eval "bench winner_profiled_no_command_buffers $W --steps 10 --warmup-steps 3 --repeats 1 \
    --profile-steps $PROFILE --top-ops 25" )
fi

summary() {
section "summary"
[ -s "$JSON" ] || { echo "(no figures yet)"; return; }
$PY - "$JSON" "$OUT/summary.md" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
steps = [r for r in rows if "img_per_s" in r]
base = {r["system"]: r["img_per_s"] for r in steps if r.get("system", "").startswith("own-")}
ghost = next((v for k, v in base.items() if "ghost" in k), None)
whole = next((v for k, v in base.items() if "batch" in k), None)
ab = [r for r in steps if r.get("ab_interleaved")]
today = next((r["img_per_s"] for r in ab if r.get("label") == "today"), None)
out = ["| variant | BN groups | bn / pool / stem / XLA options | img/s | ms/step | x today "
       "| x baseline ghost32 | x baseline batch BN |", "|" + "---|" * 8]
for r in steps:
    name = r.get("label") or r["system"]
    levers = (f"{r['bn_impl']} / {r['pool_impl']} / {r['stem_impl']} / "
              f"{' '.join(r['xla_options']) or '-'}" if "bn_impl" in r else "")
    ratio = lambda ref: f"{r['img_per_s'] / ref:.3f}" if ref else ""
    out.append(f"| {name} | {r.get('bn_group_size', '')} | {levers} | {r['img_per_s']:,.0f} | "
               f"{1e3 * r['step_s']:.2f} | {ratio(today) if r in ab else ''} | {ratio(ghost)} "
               f"| {ratio(whole)} |")
best = max((r for r in ab if r.get("bn_group_size") == min(x["bn_group_size"] for x in ab)),
           key=lambda r: r["img_per_s"], default=None)
if best:
    wide = next((r["img_per_s"] for r in ab if r.get("label", "").startswith("today_groups_of_")),
                None)
    out.append("")
    out.append(f"fastest with BN groups of {best['bn_group_size']}: {best['label']}, "
               f"{best['img_per_s']:,.0f} img/s on {best['device']} (goal 7,100 on an H200)"
               + (f"; {best['img_per_s'] / ghost:.3f}x the baseline's ghost32 (goal 1.15)"
                  if ghost else "")
               + (f"; {best['img_per_s'] / wide:.3f}x today's step with BN over the device "
                  f"batch (goal >= 1)" if wide else ""))
text = "\n".join(out)
print(text)
open(sys.argv[2], "w").write(text + "\n")
EOF
}
summary

if on input; then
section "input pipeline bench, 1 core and all $(nproc) cores"
reserve=0; on study && reserve=240  # the study's ~20 runs need about 200 s
limit=$(( $(left) - reserve )); [ "$limit" -gt 60 ] && limit=60
if [ "$limit" -gt 20 ]; then
  timeout "$limit" $PY experiments/bench_input_pipeline.py $INPUT_ARGS \
    || echo "FAILED or cut at ${limit}s: input"
else
  echo "skipped: only $(left) s left"
fi
fi

if on folders; then
section "end to end from an ImageNet-like JPEG folder, decoding workers on all $(nproc) cores"
reserve=0; on study && reserve=240
limit=$(( $(left) - reserve ))
if [ "$limit" -gt 90 ] || [ -n "${TINY:-}" ]; then
  timeout "$limit" $PY experiments/end_to_end_folders.py --root /tmp/lsgd_e2e_folders \
    --json "$JSON" $FOLDERS_ARGS || echo "FAILED or cut at ${limit}s: folders"
else
  echo "skipped: only $(left) s left"
fi
fi

if on study; then
section "Fashion-MNIST study, GPU mode"
limit=$(( $(left) - 45 ))
if [ "$limit" -gt 60 ]; then
  $PY experiments/small_scale.py $STUDY_EXTRA --fmnist-dir "$FMNIST" \
    --out /tmp/small_scale_gpu --results "$STUDY_RESULTS" \
    --time-limit "$limit" || echo "FAILED: study"
  # The committed records travel with the call (finished runs are skipped); the new ones
  # come back here: untar over experiments/results/small_scale_gpu.
  tar -C "$STUDY_RESULTS" -czf "$OUT/small_scale_gpu.tgz" . \
    && tar -C /tmp/small_scale_gpu -czf "$OUT/small_scale_gpu_logs.tgz" logs
else
  echo "skipped: only $(left) s left"
fi
summary
fi

section "done"
