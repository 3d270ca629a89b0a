"""The library leaves the process as it found it: ``train_and_evaluate`` called from
Python diverts orbax's, absl's and asyncio's noise only while it runs."""

import asyncio
import logging
import sys
import threading

import helpers
import pytest

from lsgd_jax.training.config import TrainConfig
from lsgd_jax.training.library_logs import NOISY_LOGGERS, diverted

TINY = helpers.TINY | dict(synthetic_examples=64, synthetic_eval_examples=16, epochs=1,
                           warmup_epochs=0.5, decay_epochs=(), log_every_steps=1, median_evals=1)


def _process_state():
    loggers = {name: (list(logging.getLogger(name).handlers),
                      logging.getLogger(name).propagate) for name in NOISY_LOGGERS}
    return dict(excepthook=sys.excepthook, thread_hook=threading.excepthook,
                unraisable=sys.unraisablehook,
                call_soon_threadsafe=asyncio.BaseEventLoop.call_soon_threadsafe,
                loggers=loggers)


def test_a_run_from_python_leaves_the_hooks_loggers_and_asyncio_as_they_were(tmp_path):
    from lsgd_jax.training.loop import train_and_evaluate

    before = _process_state()
    seen = {}

    def log(line):  # the run's own log: the diversion is in force while it runs
        seen.setdefault("during", _process_state())

    summary = train_and_evaluate(TrainConfig(**TINY), str(tmp_path), log=log)
    assert summary["step"] == 2
    assert seen["during"] != before  # it did divert while it ran (else this proves nothing)
    assert _process_state() == before


def test_a_run_that_raises_leaves_the_process_as_it_was_too(tmp_path):
    from lsgd_jax.training.loop import NonFiniteError, train_and_evaluate

    config = TrainConfig(**TINY | dict(checkpoint_every_steps=1))
    object.__setattr__(config, "base_lr", 1e38)  # past the flag's range: the run diverges
    before = _process_state()
    with pytest.raises(NonFiniteError):
        train_and_evaluate(config, str(tmp_path), log=lambda line: None)
    assert _process_state() == before


def test_noise_goes_to_the_file_and_the_last_error_to_the_log_object_only_inside(tmp_path):
    path = tmp_path / "orbax.log"
    before = _process_state()
    with diverted(str(path)) as library_log:
        logging.getLogger("orbax").error("save failed: no space left")
        assert library_log.last_error == "save failed: no space left"
        try:
            raise RuntimeError("Event loop is closed")
        except RuntimeError:
            sys.excepthook(*sys.exc_info())  # noise: into the file, not the console
        inner = tmp_path / "inner.log"
        with diverted(str(inner)) as nested:
            logging.getLogger("absl").error("inner")
            assert nested.last_error == "inner" and library_log.last_error != "inner"
        logging.getLogger("asyncio").error("outer again")
        assert library_log.last_error == "outer again"
    assert _process_state() == before
    text = path.read_text()
    assert "save failed: no space left" in text and "Event loop is closed" in text
    assert "outer again" in text and "inner" not in text.replace("inner.log", "")
    assert "inner" in inner.read_text()


def test_other_exceptions_still_reach_the_previous_hook(tmp_path):
    got = []
    previous = sys.excepthook
    sys.excepthook = lambda *exc: got.append(exc[1])
    try:
        with diverted(str(tmp_path / "orbax.log")):
            try:
                raise KeyError("ours")
            except KeyError:
                sys.excepthook(*sys.exc_info())
    finally:
        sys.excepthook = previous
    assert len(got) == 1 and isinstance(got[0], KeyError)


def test_a_call_on_a_closed_loop_is_recorded_inside_and_silent_after(tmp_path, monkeypatch,
                                                                      caplog):
    """Orbax's threads may call back on a closed loop after a failed save, even once the run
    has left its diversion: the command's one error line must stay the only line."""
    from lsgd_jax.training import library_logs

    loop = asyncio.new_event_loop()
    loop.close()
    path = tmp_path / "orbax.log"
    with diverted(str(path)):
        assert library_logs._call_soon_threadsafe_or_drop(loop, print) is None
    assert "its event loop is closed" in path.read_text()
    monkeypatch.setattr(library_logs, "_exit_is_quiet", True)  # the command line's exit
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        assert library_logs._call_soon_threadsafe_or_drop(loop, print) is None
    assert not caplog.records
