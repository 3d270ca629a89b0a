"""The study's settings and runs: how the paper's ImageNet recipe is shrunk (``Scale``),
the five studies (``define_studies``), and each run's trainer command.

Studies (Goyal et al. 2017): 1. linear scaling with gradual warmup across kn
(figs. 1-2, table 3a); then, at the largest kn that still matches the reference
(the paper's 8k), 2. warmup: none, constant, gradual (table 1); 3. the rate: η,
η·√k, η·k × ½, 1, 2 (table 2a); 4. zero-γ against γ = 1 (table 2b); 5. eq. (10)
with and without the momentum correction against eq. (9) (section 2.2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

# The repository (the trainer script and the default results folder are in it).
# Every run is the package's own train command, wherever the package is installed.
TRAINER = ("-m", "lsgd_jax", "train")
PAPER_EPOCHS = 90
PAPER_WARMUP_EPOCHS = 5
PAPER_DECAY_EPOCHS = (30, 60, 80)
PAPER_TRAIN_EXAMPLES = 1_281_167
PAPER_REFERENCE_KN = 256
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
DIVERGED = "diverged.json"
STUDY_KEYS = ("kn_sweep", "warmup", "lr_rule", "zero_gamma", "momentum")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scale:
    """How far the paper's ImageNet recipe is shrunk; one instance per mode of the study."""

    name: str
    model: str
    train_examples: int      # the whole training split, or a class-balanced subset (quick)
    val_examples: int
    subset: bool             # write a subset of the IDX files (quick) or read them as they are
    epochs: float            # the paper's 90; warmup and decays scale by epochs / 90
    reference_kn: int        # the paper's 256
    bn_group: int            # the paper's n = 32
    max_devices: int         # fake CPU devices per run: min(max_devices, kn / n)
    base_lr: float           # η at reference_kn (the paper: 0.1 at 256)
    kn_sweep: tuple[int, ...]
    seeds: tuple[int, ...]           # the reference, every compared row up to seeded_k
    extra_seeds: tuple[int, ...]     # sweep rows beyond seeded_k (where it clearly breaks)
    seeded_k: int                    # the paper's k = 32
    tolerance: float                 # percentage points that still count as "matches"
    eval_batch: int
    large_kn: int | None = None      # None: the largest kn of the sweep that matches
    num_steps: int | None = None     # cap per run (quick only)
    platform: str = "cpu"            # "cpu": fake CPU devices; "gpu": the visible GPU
    parallel: int = 1                # runs trained at once (a GPU is idle between small steps)
    run_order: tuple[int, ...] = ()  # kn first trained, per seed (default: the sweep's order)
    seed_major: bool = True          # seed 0 of every row first; else run_order's kn first
    beyond_kn: tuple[int, ...] = (512, 1024)  # where the "beyond" section compares recipes
    ablations: bool = True           # after the sweep, the ablations at the chosen kn
    label: str = ""                  # the mode's column title in the claims table

    @property
    def factor(self) -> float:
        return self.epochs / PAPER_EPOCHS

    def devices(self, kn: int) -> int:
        return max(1, min(self.max_devices, kn // self.bn_group))


# Sizes from measurements on this 2-core machine (float32, 28×28×1): ResNet-8 trains at
# 1,230 images/s at kn = 16 on one fake device, 1,390-1,580 at kn = 32-64 on two, 1,150 at
# 128-256 and 910 at 512; ResNet-20 at about a third of that. ResNet-8 at kn = 16, η = 0.1,
# 5 epochs reached 9.6 % test error (seed 0). See experiments/results/README.md.
FULL = Scale(name="cpu", model="resnet8", train_examples=60_000, val_examples=10_000,
             subset=False, epochs=5, reference_kn=16, bn_group=16, max_devices=2, base_lr=0.1,
             kn_sweep=(16, 32, 64, 128, 256, 512, 1024, 2048), seeds=(0, 1, 2),
             extra_seeds=(0,), seeded_k=32, tolerance=0.3, eval_batch=1000)
# GPU mode: the CPU mode's recipe with twice the epochs, so that every k has twice the
# iterations (k = 16: 2,340, as many as k = 8 had on the CPU, where it matched). It asks
# whether the CPU sweep's break at k = 16-32 comes from the iteration budget. One GPU;
# small-kn steps leave the GPU idle between launches, so 6 runs train at once, the longest
# (smallest kn, every seed) first so that the last to finish are short.
GPU = dataclasses.replace(FULL, name="gpu", epochs=10, max_devices=1, platform="gpu",
                          parallel=6, seed_major=False,
                          run_order=(16, 32, 64, 128, 256, 512, 1024, 2048))
# Long mode: the CPU mode with 30 epochs, so that k = 32 (kn = 512) gets 3,510 iterations,
# 195 of them warmup: more than k = 8 had in the GPU mode, where it matched. It tests
# whether the break at k = 32 comes from the iteration budget. The sweep only: the
# reference and k = 16, 32 with 3 seeds, k = 64 with one to show where it breaks.
LONG = dataclasses.replace(FULL, name="long", epochs=30, kn_sweep=(16, 256, 512, 1024),
                           ablations=False, run_order=(16, 512, 256, 1024),
                           label="long mode (30 epochs)")
QUICK = Scale(name="quick", model="resnet8", train_examples=320, val_examples=80, subset=True,
              epochs=2, reference_kn=16, bn_group=8, max_devices=2, base_lr=0.05,
              kn_sweep=(16, 32, 64), seeds=(0,), extra_seeds=(0,), seeded_k=2,
              tolerance=0.3, eval_batch=40, large_kn=32, num_steps=3, beyond_kn=(32, 64))

# The paper's ImageNet top-1 errors (%) by k = kn / 256 (section 5, table 3a / fig. 1).
PAPER_KN_ERROR = {0.5: 23.49, 1: 23.60, 2: 23.48, 4: 23.53, 8: 23.49, 16: 23.56, 32: 23.74,
                  64: 24.79, 128: 27.55, 256: 33.96}


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: a name (its workdir and record folder) and its trainer flags."""

    name: str
    flags: tuple[tuple[str, str], ...]
    record: str  # where the finished run's metrics are kept (committed)

    def flag(self, key: str) -> str:
        return dict(self.flags)[key]

    @property
    def workdir(self) -> str:
        return self.flag("--workdir")


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a study's table: the runs over seeds, and the paper's figure for it."""

    label: str
    runs: tuple[Run, ...]
    paper: str


@dataclasses.dataclass(frozen=True)
class Study:
    key: str
    title: str
    rows: tuple[Row, ...]
    reference: Run  # drawn in black under every curve, as in the paper's figures


@dataclasses.dataclass(frozen=True)
class Paths:
    out: str       # workdirs (not committed)
    results: str   # tables, plots, and the records of finished runs (committed)
    source: str = FMNIST_DIR  # the four IDX .gz files of Fashion-MNIST

    def data_dir(self, scale: Scale) -> str:
        if not scale.subset:
            return self.source
        return os.path.join(self.out, "data",
                            f"fmnist_train{scale.train_examples}_val{scale.val_examples}")


def _run(scale: Scale, paths: Paths, name: str, seed: int, *, kn: int,
         base_lr: float | None = None, reference_kn: int | None = None, warmup: str = "gradual",
         zero_gamma: bool = True, form: str = "eq9", correction: bool = True) -> Run:
    f = scale.factor
    steps_per_epoch = scale.train_examples // kn
    full_name = f"{name}_s{seed}"
    flags = {
        "--workdir": os.path.join(paths.out, full_name),
        "--data": "fashion_mnist", "--data-dir": paths.data_dir(scale), "--model": scale.model,
        "--dtype": "float32", "--decode-threads": "1",
        "--batch-size": str(kn), "--bn-group-size": str(scale.bn_group),
        "--eval-batch-size": str(scale.eval_batch),
        "--epochs": f"{scale.epochs:g}",
        "--base-lr": f"{scale.base_lr if base_lr is None else base_lr:.6g}",
        "--reference-batch-size": str(reference_kn or scale.reference_kn),
        "--warmup": warmup, "--warmup-epochs": f"{PAPER_WARMUP_EPOCHS * f:.6g}",
        "--decay-epochs": ",".join(f"{e * f:.6g}" for e in PAPER_DECAY_EPOCHS),
        "--zero-gamma": str(zero_gamma).lower(), "--momentum-form": form,
        "--momentum-correction": str(correction).lower(), "--seed": str(seed),
        # About 20 training points per epoch for the curves, at any kn.
        "--log-every-steps": str(max(1, steps_per_epoch // 20)),
        "--keep-checkpoints": "1", "--keep-every-epochs": "0",
    }
    if scale.platform == "cpu":
        flags["--cpu-devices"] = str(scale.devices(kn))
    if scale.num_steps is not None:
        flags["--num-steps"] = str(scale.num_steps)
    return Run(full_name, tuple(flags.items()), os.path.join(paths.results, "runs", full_name))


def sweep_study(scale: Scale, paths: Paths) -> Study:
    ref = scale.reference_kn
    rows = []
    for kn in scale.kn_sweep:
        k = kn // ref
        seeds = scale.seeds if k <= scale.seeded_k else scale.extra_seeds
        label = f"kn={kn} (reference)" if kn == ref else f"kn={kn}, k={k}"
        rows.append(Row(label, tuple(_run(scale, paths, f"kn{kn}", s, kn=kn) for s in seeds),
                        _paper_kn(k)))
    return Study("kn_sweep", "Linear scaling with gradual warmup across kn (figs. 1-2, table 3a)",
                 tuple(rows), rows[0].runs[0])


def ablation_studies(scale: Scale, paths: Paths, big: int) -> list[Study]:
    """Tables 1, 2a, 2b and the momentum correction at kn = ``big``."""
    ref = scale.reference_kn
    k = big / ref
    eta = scale.base_lr
    seeds = scale.seeds

    def row(label, name, paper, **kw):
        return Row(label, tuple(_run(scale, paths, name, s, kn=big, **kw) for s in seeds), paper)

    base = Row(f"kn={ref} (reference)", tuple(_run(scale, paths, f"kn{ref}", s, kn=ref)
                                            for s in seeds), "23.60 ± 0.12")
    large = row(f"kn={big}, gradual warmup", f"kn{big}", "23.74 ± 0.09")
    reference = base.runs[0]
    return [
        Study("warmup", f"Warmup at kn={big}, k={k:g} (table 1)", (
            base,
            row(f"kn={big}, no warmup", f"kn{big}_nowarmup", "24.84 ± 0.37", warmup="none"),
            row(f"kn={big}, constant warmup", f"kn{big}_constwarmup", "25.88 ± 0.56",
                warmup="constant"),
            large), reference),
        Study("lr_rule", f"The rate at kn={big}, k={k:g} (table 2a)", (
            base,
            # No scaling: kn is its own reference, so k = 1 and nothing to warm up.
            row(f"η = {eta:g} (no scaling)", f"kn{big}_lr_eta", "41.67", reference_kn=big),
            # Warmup runs from the base rate to base × k, so base = η/√k ends at η·√k.
            row(f"η·√k = {eta * math.sqrt(k):.3g}", f"kn{big}_lr_sqrtk", "26.22",
                base_lr=eta / math.sqrt(k)),
            row(f"η·k × ½ = {eta * k / 2:.3g}", f"kn{big}_lr_half", "24.27", base_lr=eta / 2),
            dataclasses.replace(large, label=f"η·k = {eta * k:.3g} (linear scaling)",
                                paper="23.74"),
            row(f"η·k × 2 = {eta * k * 2:.3g}", f"kn{big}_lr_double", "24.05", base_lr=eta * 2),
        ), reference),
        Study("zero_gamma", f"Zero-γ at kn={big} (table 2b)", (
            base,
            row(f"kn={big}, γ=1", f"kn{big}_gamma1", "24.11", zero_gamma=False),
            dataclasses.replace(large, label=f"kn={big}, γ=0", paper="23.74")), reference),
        Study("momentum", f"Momentum correction at kn={big}, gradual warmup (eqs. 9-10)", (
            base,
            row("eq. (10), no correction", f"kn{big}_eq10_nocorr", "– (sec. 2.2: unstable)",
                form="eq10", correction=False),
            row("eq. (10) with correction", f"kn{big}_eq10_corr", "= eq. (9)", form="eq10",
                correction=True),
            dataclasses.replace(large, label="eq. (9)", paper="23.74 ± 0.09")), reference),
    ]


def define_studies(scale: Scale, paths: Paths, large_kn: int | None = None) -> list[Study]:
    """The sweep, and the ablations once the kn they run at is known (see ``choose_large_kn``)."""
    studies = [sweep_study(scale, paths)]
    big = large_kn or scale.large_kn or stored_large_kn(paths)
    if big is not None and scale.ablations:
        studies += ablation_studies(scale, paths, big)
    return studies


def _paper_kn(k: float) -> str:
    value = PAPER_KN_ERROR.get(k)
    return "–" if value is None else f"{value:.2f} (kn={int(k * PAPER_REFERENCE_KN)})"


def unique_runs(studies: list[Study]) -> list[Run]:
    """Every run once, in study order; one name must mean one set of flags."""
    seen: dict[str, Run] = {}
    for study in studies:
        for row in study.rows:
            for run in row.runs:
                if run.name in seen and seen[run.name] != run:
                    raise ValueError(f"run {run.name} is defined with two sets of flags")
                seen.setdefault(run.name, run)
    return list(seen.values())


def command(run: Run) -> list[str]:
    """The run's command after ``python``: the train command and the run's flags."""
    return [*TRAINER, *train_flags(run)]


def train_flags(run: Run) -> list[str]:
    """The run's flags of ``lsgd-jax train``, as typed."""
    return [x for kv in run.flags for x in kv]



def write_subset(scale: Scale, paths: Paths) -> str:
    """Class-balanced subsets of the train and test IDX files, written once (seed 0)."""
    from lsgd_jax.data.fashion_mnist import write_subset as write

    return write(paths.source, paths.data_dir(scale),
                 {"train": scale.train_examples, "validation": scale.val_examples})



MODES = {"cpu": FULL, "gpu": GPU, "long": LONG, "quick": QUICK}


def order(runs: list[Run], scale: Scale) -> list[Run]:
    """Seed 0 of every row first (a partial suite already spans every setting), within a
    seed the kn of ``scale.run_order`` first; or, without ``seed_major``, by kn first."""
    rank = {kn: i for i, kn in enumerate(scale.run_order)}

    def key(r: Run) -> tuple[int, int]:
        seed, kn = int(r.flag("--seed")), rank.get(int(r.flag("--batch-size")), len(rank))
        return (seed, kn) if scale.seed_major else (kn, seed)

    return sorted(runs, key=key)


def stored_large_kn(paths: Paths) -> int | None:
    path = os.path.join(paths.results, "ablation_kn.json")
    if os.path.exists(path):
        with open(path) as f:
            return int(json.load(f)["kn"])
    return None


def store_large_kn(paths: Paths, kn: int, reason: str) -> None:
    os.makedirs(paths.results, exist_ok=True)
    with open(os.path.join(paths.results, "ablation_kn.json"), "w") as f:
        json.dump({"kn": kn, "reason": reason}, f, indent=1)
