#!/usr/bin/env bash
# The two k = 32 follow-ups of the long study, seed 0, from the study's worktree (293d48d)
# and its pinned venv; each the kn512_s0 command (python experiments/small_scale.py --mode long
# --list) with one flag changed. Records: config.json and metrics.jsonl of each workdir.
set -u
cd "${STUDY_WORKTREE:-.}"  # a checkout of 293d48d
mkdir -p runs/followups
. "${STUDY_VENV:-.venv-study}/bin/activate"  # built from constraints/study-py311.txt
COMMON="--data fashion_mnist --data-dir /usr/share/datasets/fashion-mnist --model resnet8 --dtype float32 --decode-threads 1 --batch-size 512 --bn-group-size 16 --eval-batch-size 1000 --epochs 30 --reference-batch-size 16 --warmup gradual --decay-epochs 10,20,26.6667 --zero-gamma true --momentum-form eq9 --momentum-correction true --seed 0 --log-every-steps 5 --keep-checkpoints 1 --keep-every-epochs 0 --cpu-devices 2"
# A: the rate at half the linear scaling rule's (eta*k x 1/2: --base-lr 0.05 at reference 16)
nice -n 10 python -m lsgd_jax train --workdir runs/followups/kn512_halfrate_s0 $COMMON --base-lr 0.05 --warmup-epochs 1.66667 > runs/followups/halfrate.log 2>&1
echo "A rc=$?" >> runs/followups/status
# B: the linear scaling rule's rate with a 4x longer gradual warmup (6.66667 epochs: 780 iterations)
nice -n 10 python -m lsgd_jax train --workdir runs/followups/kn512_warmup4x_s0 $COMMON --base-lr 0.1 --warmup-epochs 6.66667 > runs/followups/warmup4x.log 2>&1
echo "B rc=$?" >> runs/followups/status
