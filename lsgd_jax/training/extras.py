"""The optional extras of ``pyproject.toml``: a missing one is one line naming the
``pip install`` that brings it, never a traceback.

Each extra is checked where it is first needed (the curves, the TensorBoard viewer,
ImageNet's tfds), before anything is started or written.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# extra -> the modules it brings that the code imports, and what needs them.
EXTRAS = {
    "plot": (("matplotlib",), "drawing the curves"),
    "tensorboard": (("tensorboard",), "viewing WORKDIR/tensorboard"),
    "data": (("tensorflow_datasets", "array_record"),
             "--data imagenet from a tfds directory (ArrayRecord files; its folders need none)"),
}


class MissingExtraError(ValueError):
    """An optional module is not installed; the message names the ``pip install``."""


def install_command(extra: str) -> str:
    """The command that installs ``extra`` into a checkout's environment."""
    return f'pip install -e ".[{extra}]"'


def available(module: str) -> bool:
    """Whether ``module`` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(extra: str, module: str | None = None, *,
            purpose: str | None = None) -> ModuleType | None:
    """Import ``module`` (default: each module of ``extra``; returns the last); raise
    MissingExtraError, one line naming what needs it (``purpose``, default the extra's)
    and the ``pip install``, when it is missing."""
    modules, default_purpose = EXTRAS[extra]
    purpose = purpose or default_purpose
    imported = None
    for name in (module,) if module else modules:
        try:
            imported = importlib.import_module(name)
        except ImportError:
            raise MissingExtraError(
                f"{purpose} needs {name.split('.')[0]}, from the {extra!r} extra, which is "
                f"not installed; install it with: {install_command(extra)}") from None
    return imported


def check_for_data(data: str, data_dir: str | None = None) -> None:
    """Raise MissingExtraError when the data set ``data`` needs an extra that is missing:
    ImageNet from a tfds directory does; ImageNet from its folders does not."""
    if data == "imagenet":
        from lsgd_jax.data.folders import has_class_folders

        if has_class_folders(data_dir):
            return
        for name in EXTRAS["data"][0]:
            if not available(name):
                require("data", name)
