"""Every example in the package's docstrings runs and prints what it shows."""

import doctest
import importlib
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lsgd_jax"
WITH_EXAMPLES = sorted(
    ".".join(("lsgd_jax", *path.relative_to(PACKAGE).with_suffix("").parts))
    for path in PACKAGE.rglob("*.py") if ">>>" in path.read_text())


def test_the_package_has_examples_to_run():
    assert {"lsgd_jax.rules.schedules", "lsgd_jax.rules.optim", "lsgd_jax.rules.lars"} <= set(WITH_EXAMPLES)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{name}: no example was run"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
