"""The paper's five claims at a small scale (Fashion-MNIST): settings, runner, reports.

``experiments/small_scale.py`` is its command line (``lsgd_jax.study.cli.main``). The
modules: ``definitions`` (how the recipe is shrunk, the studies and their runs),
``runner`` (a run's status, its process, its record; several at once), ``report``
(tables, verdicts from ``lsgd_jax.study.verdicts``, plots, the results README's snapshot),
``beyond`` (LARS and the later large-batch recipe where the paper's recipe breaks).
"""

from lsgd_jax.study.cli import main
from lsgd_jax.study.definitions import (
    FMNIST_DIR,
    FULL,
    GPU,
    LONG,
    MODES,
    QUICK,
    STUDY_KEYS,
    Paths,
    Row,
    Run,
    Scale,
    Study,
    command,
    define_studies,
    order,
    store_large_kn,
    stored_large_kn,
    train_flags,
    unique_runs,
    write_subset,
)
from lsgd_jax.study.report import (
    budget_points,
    claim_items,
    claims,
    claims_across_modes,
    study_table,
    update_readme,
    write_reports,
)
from lsgd_jax.study.runner import (
    Pool,
    choose_large_kn,
    execute,
    finish,
    git_commit,
    keep_record,
    mark_diverged,
    metrics_dir,
    run_error,
    run_seconds,
    start,
    status,
)

__all__ = [
    "FMNIST_DIR", "FULL", "GPU", "LONG", "MODES", "QUICK", "STUDY_KEYS", "Paths", "Pool", "Row", "Run",
    "Scale", "Study", "budget_points", "choose_large_kn", "claim_items", "claims", "claims_across_modes",
    "command", "define_studies", "execute", "finish", "git_commit", "keep_record", "main",
    "mark_diverged", "metrics_dir", "order",
    "run_error", "run_seconds", "start", "status", "store_large_kn", "stored_large_kn",
    "study_table", "train_flags", "unique_runs", "update_readme", "write_reports", "write_subset",
]
