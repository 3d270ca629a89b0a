"""The paper's five claims on the whole of Fashion-MNIST, on a CPU.

    nohup nice -n 19 python experiments/small_scale.py --commit > runs/small_scale.log 2>&1 &
    python experiments/small_scale.py --list          # every run's status and command
    python experiments/small_scale.py --report-only   # tables, verdicts and plots only
    python experiments/small_scale.py --quick         # tiny runs of every study (CI)

Studies (Goyal et al. 2017): 1. linear scaling with gradual warmup across kn
(figs. 1-2, table 3a); then, at the largest kn that still matches the reference
(the paper's 8k), 2. warmup: none, constant, gradual (table 1); 3. the rate: η,
η·√k, η·k × ½, 1, 2 (table 2a); 4. zero-γ against γ = 1 (table 2b); 5. eq. (10)
with and without the momentum correction against eq. (9) (section 2.2).

Every run is one ``experiments/imagenet_resnet50.py`` command (``--list`` prints
them), run as its own process in its own workdir under ``--out``. A finished run's
``metrics.jsonl`` and ``config.json`` are copied into the results folder
(``<results>/runs/<name>/``), which is what counts as done: a fresh clone with the
committed results skips those runs, and an interrupted run resumes from its
checkpoint. With ``--commit`` each finished run's record, tables and plots are
committed to git at once, so the work survives the end of the machine it ran on.
Reported figure: the paper's, the median top-1 error of the last 5 evaluations
(the last 5/90 of a run), mean ± sample std over seeds.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lsgd_jax.study import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
