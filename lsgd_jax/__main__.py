"""``python -m lsgd_jax train|evaluate|export|predict ...`` (the ``lsgd-jax`` command)."""

import sys

from lsgd_jax.cli.main import main

sys.exit(main())
