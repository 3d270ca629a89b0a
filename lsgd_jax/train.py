"""The training loop: ``train_and_evaluate(config, workdir)``.

One function for one GPU, one node or many hosts (every process runs it with
the same config). Sections, in order: processes and mesh; input; model and
optimizer; state (fresh or resumed); steps; the loop (metrics of step t are
read while step t+1 runs, so the devices never wait for the host); evaluation;
checkpoints; preemption; the result (the paper's figure: median top-1 error of
the last 5 epochs).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lsgd_jax.checkpoint import Checkpoints, check_resumable, state_sha256
from lsgd_jax.config import TrainConfig
from lsgd_jax.metrics import (
    MetricsWriter,
    eval_history,
    format_duration,
    paper_error,
    plural,
    read_metrics,
)
from lsgd_jax.models import get_model
from lsgd_jax.optim import goyal_sgd
from lsgd_jax.parallel import InFlight, data_sharding, make_mesh
from lsgd_jax.schedules import goyal_schedule
from lsgd_jax.step import (
    create_train_state,
    make_eval_step,
    make_train_step,
    validate_batch_layout,
)
from lsgd_jax.workdir import WorkdirError, WorkdirLock


class NonFiniteError(FloatingPointError):
    """The loss, a gradient or the updated state was not finite; the run stops without saving it."""


# ------------------------------------------------------------------ preemption
class PreemptionWatcher:
    """Tells every process, at the same step, that the job is being preempted.

    Several processes: JAX's preemption sync manager (started by
    ``jax.distributed.initialize``) catches SIGTERM on any host and agrees on a
    step at which all of them save. One process: a SIGTERM handler sets a flag.

    Ctrl-C (SIGINT) is a preemption too: the first one saves at the agreed step on
    every process and exits; a second one aborts at once (KeyboardInterrupt).
    """

    def __init__(self, log: Callable[[str], None] = print):
        self.multi = jax.process_count() > 1
        self._flag = threading.Event()
        self._log = log
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            if not self.multi:
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._flag.set()

    def _on_sigint(self, signum, frame):
        del frame
        if self._flag.is_set():
            raise KeyboardInterrupt("second Ctrl-C")
        self._flag.set()
        self._log("Ctrl-C: saving a checkpoint at the next step, then exiting "
                  "(Ctrl-C again aborts at once, losing the work since the last checkpoint)")
        if self.multi:
            # Several processes agree on the step through JAX's preemption notice,
            # which listens for SIGTERM.
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._flag.is_set()

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


# ------------------------------------------------------------------ input
def open_sources(config: TrainConfig):
    """The train and validation sources of ``config.data``."""
    from lsgd_jax.data import get_source

    kwargs: dict[str, Any] = {}
    if config.data == "synthetic":
        kwargs = {"seed": config.seed}
        train = get_source("synthetic", split="train", image_size=config.image_size,
                           num_examples=config.synthetic_examples, **kwargs)
        val = get_source("synthetic", split="validation", image_size=config.image_size,
                         num_examples=config.synthetic_eval_examples, **kwargs)
        return train, val
    if config.data == "imagenet":
        kwargs = {"num_workers": config.num_workers, "max_bad_fraction": config.max_bad_fraction,
                  "builder_name": config.tfds_name}
    augment = ({"color_jitter": config.color_jitter, "lighting": config.lighting}
               if config.data == "imagenet" else {})
    train = get_source(config.data, split="train", data_dir=config.data_dir,
                       image_size=config.image_size, **kwargs, **augment)
    val = get_source(config.data, split="validation", data_dir=config.data_dir,
                     image_size=config.image_size, **kwargs)
    return train, val


def _check_eval_batch(eval_batch_size: int, num_devices: int, process_count: int) -> None:
    if eval_batch_size % num_devices or eval_batch_size % process_count:
        raise ValueError(
            f"eval_batch_size={eval_batch_size} must be divisible by the {num_devices} devices "
            f"and the {process_count} processes; use a multiple of {num_devices}"
        )


# ------------------------------------------------------------------ the loop
def train_and_evaluate(config: TrainConfig, workdir: str, *,
                       log: Callable[[str], None] | None = None) -> dict:
    """Train and evaluate ``config`` in ``workdir``, resuming from its latest checkpoint.

    Returns a summary dict (final step, last eval, the paper's figure when
    available, and whether the run stopped for preemption).

    Raises:
      ValueError: bad configuration (before anything is compiled); WorkdirError, a
        ValueError, when the workdir is in use by another run, is not a writable
        directory or has no room for a checkpoint.
      NonFiniteError: the loss, a gradient or the updated state became non-finite.
    """
    is_main = jax.process_index() == 0
    if log is None:
        def log(msg: str) -> None:
            if is_main:
                print(msg, flush=True)

    # --- one run per workdir: process 0 holds the lock; every process learns the outcome
    lock = WorkdirLock(workdir) if is_main else None
    error = note = ""
    if lock is not None:
        try:
            note = lock.acquire()
        except WorkdirError as e:
            error = str(e)
    error = _same_on_every_process(error)
    if error:
        raise WorkdirError(error)
    if note:
        log(f"{workdir}: {note}")
    try:
        return _train_and_evaluate(config, workdir, log)
    finally:
        if lock is not None:
            lock.release()


def _check_free_space(workdir: str, state) -> str:
    """An error message when the workdir cannot hold one more checkpoint, else ""."""
    need = sum(x.nbytes for x in jax.tree.leaves(state))
    need = int(need * 1.1) + (1 << 20)  # orbax's metadata and file-system blocks
    leftovers = 0  # unfinished saves of an earlier run are removed before the next save
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            if "orbax-checkpoint-tmp" in name:
                for root, _, files in os.walk(os.path.join(ckpt_dir, name)):
                    leftovers += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    free = shutil.disk_usage(workdir).free + leftovers
    if free >= need:
        return ""
    return (f"not enough free space for a checkpoint in --workdir {workdir}: "
            f"{free / 2**20:.1f} MiB free, a checkpoint needs about {need / 2**20:.1f} MiB. "
            "Free some space (the run resumes from its latest complete checkpoint) or choose "
            "another --workdir")


def _same_on_every_process(text: str, size: int = 2048) -> str:
    """Process 0's ``text`` on every process (so all raise the same error, or none)."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    buf = np.zeros(size, np.uint8)
    raw = text.encode()[:size]
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(out[out != 0]).decode(errors="replace")


def _train_and_evaluate(config: TrainConfig, workdir: str, log: Callable[[str], None]) -> dict:
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0

    # --- processes, mesh and input; every check before compiling ---------
    mesh = make_mesh()
    num_devices = mesh.devices.size
    check_resumable(os.path.join(workdir, "checkpoints"), config.to_dict())
    train_source, eval_source = open_sources(config)
    derived = config.derived(train_source.num_examples)
    layout = validate_batch_layout(global_batch_size=config.batch_size, num_devices=num_devices,
                                   grad_accum_steps=config.grad_accum_steps,
                                   bn_group_size=config.bn_group_size)
    if config.batch_size % process_count:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by the "
                         f"{process_count} processes")
    eval_batch_size = config.eval_batch_size or config.batch_size
    _check_eval_batch(eval_batch_size, num_devices, process_count)
    spe, total = derived["steps_per_epoch"], derived["total_steps"]
    planned = math.ceil(config.epochs * spe)  # --num-steps only cuts a run short
    if derived["warmup_steps"] > planned:
        log(f"warning: the warmup ({derived['warmup_steps']} steps, --warmup-epochs "
            f"{config.warmup_epochs:g}) is longer than the run ({planned} steps, --epochs "
            f"{config.epochs:g}): the rate never reaches its peak {derived['peak_lr']:g}")
    eval_steps = set(derived["eval_steps"])
    derived.update(num_devices=num_devices, num_processes=process_count,
                   per_device_batch=layout.per_device, microbatch=layout.microbatch)

    # --- model and optimizer (the paper's rules, all from the config) ----
    model = get_model(config.model, num_classes=train_source.num_classes, dtype=config.dtype,
                      bn_group_size=config.bn_group_size,
                      zero_init_residual=config.zero_init_residual)
    schedule = goyal_schedule(
        batch_size=config.batch_size, steps_per_epoch=spe, base_lr=config.base_lr,
        reference_batch_size=config.reference_batch_size, warmup_epochs=config.warmup_epochs,
        warmup=config.warmup, decay_epochs=config.decay_epochs, decay_factor=config.decay_factor)
    tx = goyal_sgd(schedule, momentum=config.momentum, nesterov=config.nesterov,
                   weight_decay=config.weight_decay, form=config.momentum_form,
                   momentum_correction=config.momentum_correction)

    # --- state: fresh, or the latest complete checkpoint -------------------
    os.makedirs(workdir, exist_ok=True)
    state = create_train_state(model, tx, rng=jax.random.key(config.seed),
                               input_shape=(1, *train_source.image_shape), mesh=mesh)
    error = _check_free_space(workdir, state) if is_main else ""
    error = _same_on_every_process(error)
    if error:
        raise WorkdirError(error)
    ckpts = Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                        keep_period=config.keep_every_epochs * spe)
    position = None
    restored = ckpts.restore_latest(state, config=config.to_dict(), log=log)
    if restored is not None:
        state, data_item, _, latest = restored
        position = data_item["position"]
        log(f"resuming from {ckpts.directory}/{latest} (epoch {position['epoch']}, "
            f"step {position['step']} of the epoch; its state SHA-256 verified)")
    else:
        log(f"no checkpoint in {ckpts.directory}: starting from scratch")
    step = int(jax.device_get(state.step))
    done = read_metrics(workdir, "result") if step >= total else []
    # Process 0 writes metrics.jsonl: its reading decides for every process.
    if _same_on_every_process("finished" if done else "") == "finished":
        # A rerun of a finished run: nothing to do, nothing to record.
        ckpts.close()
        result = done[-1] if done else {}
        figure = result.get("median_top1_error")
        log(f"already finished at step {step} of {total}"
            + (f": result {100 * figure:.2f}% top-1 error" if figure is not None else "")
            + f". Nothing to do; use a new --workdir for a new run.")
        return {"step": step, "total_steps": total, "preempted": False,
                **{k: v for k, v in result.items() if k not in ("kind", "step", "time")}}

    writer = MetricsWriter(workdir, enabled=is_main)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump({"config": config.to_dict(), "derived": derived}, f, indent=2, sort_keys=True)
    log("config: " + json.dumps(config.to_dict(), sort_keys=True))
    log(f"kn={config.batch_size} (k={derived['num_bn_workers']} BN workers of "
        f"n={config.bn_group_size}) on {plural(num_devices, 'device')} in "
        f"{plural(process_count, 'process')}, {layout.per_device} images per device in "
        f"{plural(config.grad_accum_steps, 'microbatch')}; {spe} steps per epoch, {total} steps; "
        f"peak rate {derived['peak_lr']:g} after {plural(derived['warmup_steps'], 'warmup step')} "
        f"({config.warmup}); each epoch leaves out the last "
        f"{derived['examples_left_out_per_epoch']} of its {derived['num_train_examples']} "
        f"shuffled examples (N mod kn)")
    writer.write("start", step, **{k: v for k, v in derived.items() if not isinstance(v, list)})

    # --- steps ---------------------------------------------------------------
    pixel_stats = dict(pixel_mean=train_source.pixel_mean, pixel_std=train_source.pixel_std)
    train_step = make_train_step(model, tx, mesh, global_batch_size=config.batch_size,
                                 bn_group_size=config.bn_group_size,
                                 grad_accum_steps=config.grad_accum_steps,
                                 allreduce=config.allreduce, **pixel_stats)
    eval_step = make_eval_step(model, mesh, **pixel_stats)

    from lsgd_jax.data import TrainIterator, eval_batches, prefetch_to_mesh

    def evaluate(state) -> dict:
        batches = eval_batches(eval_source, global_batch_size=eval_batch_size,
                               process_index=process_index, process_count=process_count)
        sums = None
        # Each eval step holds an all-reduce: at most two in flight (see InFlight).
        inflight = InFlight(depth=2)
        with prefetch_to_mesh(batches, data_sharding(mesh), size=2) as stream:
            for batch in stream:
                m = inflight.push(eval_step(state, batch))
                sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
        sums = jax.device_get(sums)
        count = int(sums["count"])
        return {"top1_error": float(sums["top1_errors"]) / count,
                "top5_error": float(sums["top5_errors"]) / count,
                "loss": float(sums["loss_sum"]) / count, "count": count}

    def save(step: int, state, position) -> None:
        try:  # the step's guard keeps the state finite; never write one that is not
            digest = state_sha256(state, require_finite=True)
        except FloatingPointError as e:
            raise NonFiniteError(f"{e} at step {step}; not saved. Lower --base-lr.") from None
        ckpts.save(step, state, position={"position": position.to_dict(), "seed": config.seed},
                   meta={"config": config.to_dict(), "state_sha256": digest})
        pending_records.append((step, digest))

    pending_records: list[tuple[int, str]] = []

    def record_committed(wait: bool = False) -> None:
        """The ``checkpoint`` record is written once the save is complete on disk."""
        if pending_records and (wait or not ckpts.saving()):
            ckpts.wait()
            for saved, digest in pending_records:
                writer.write("checkpoint", saved, epoch=saved / spe, state_sha256=digest)
            pending_records.clear()

    iterator = TrainIterator(train_source, global_batch_size=config.batch_size, seed=config.seed,
                             process_index=process_index, process_count=process_count,
                             position=position)
    prefetch = prefetch_to_mesh(iterator, data_sharding(mesh), size=2)
    preemption = PreemptionWatcher(log)
    window: list[dict] = []
    last_eval_step = max((int(r["step"]) for r in eval_history(workdir).values()), default=-1)
    preempted = False
    start_step, t_start, t_window = step, time.time(), time.time()

    def check(step_done: int, metrics) -> None:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not values.pop("finite"):
            lr = float(schedule(step_done - 1))
            raise NonFiniteError(
                f"non-finite loss, gradient or updated state at step {step_done} (learning "
                f"rate {lr:g}, loss {values['loss']}); the state was not updated with it and no "
                f"checkpoint holds it; the latest checkpoint is step {ckpts.latest_step()}. "
                "Lower --base-lr or lengthen --warmup-epochs.")
        window.append(values)

    # --- the loop ---------------------------------------------------------------
    try:
        pending = None
        first = step < total
        while step < total:
            batch = next(prefetch)
            if first:
                log("compiling the train step (the first step includes it)…")
                t_first = time.time()
            state, metrics = train_step(state, batch)
            step += 1
            if first:
                # Wait for it: the compile time is worth knowing, and the ETA counts
                # only the steps after it.
                jax.block_until_ready(metrics)
                log(f"first step done in {time.time() - t_first:.1f} s (compilation included)")
                first = False
                start_step, t_start, t_window = step, time.time(), t_first
                check(step, metrics)
                pending = None
            else:
                if pending is not None:  # read step t-1 while step t runs
                    check(*pending)
                pending = (step, metrics)

            epoch_end = step % spe == 0
            preempted = preemption.reached(step)
            save_now = (epoch_end or step == total or preempted
                        or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0))
            eval_now = step in eval_steps
            log_now = step % config.log_every_steps == 0 or save_now
            if (save_now or eval_now or log_now) and pending is not None:
                check(*pending)
                pending = None
            if log_now and window:
                now = time.time()
                mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                rate = len(window) * config.batch_size / max(now - t_window, 1e-9)
                eta = ("ETA after the next steps" if step == start_step else "ETA " +
                       format_duration((now - t_start) / (step - start_step) * (total - step)))
                lr = float(schedule(step - 1))
                writer.write("train", step, epoch=step / spe, lr=lr, images_per_second=rate, **mean)
                log(f"step {step}/{total} epoch {step / spe:.2f} | loss {mean['loss']:.4f} "
                    f"top1 {100 * mean['top1_error']:.2f}% | lr {lr:.4g} | {rate:,.0f} img/s | "
                    f"{eta}")
                window.clear()
                t_window = now
            record_committed()
            if save_now:
                save(step, state, prefetch.position)
            if eval_now and step != last_eval_step:
                result = evaluate(state)
                writer.write("eval", step, epoch=step / spe, **result)
                log(f"eval at step {step} (epoch {step / spe:.2f}): top-1 error "
                    f"{100 * result['top1_error']:.2f}%, top-5 error "
                    f"{100 * result['top5_error']:.2f}% over {result['count']} images")
                last_eval_step = step
            if preempted:
                break
        if pending is not None:
            check(*pending)
    finally:
        prefetch.close()
        preemption.close()
        record_committed(wait=True)  # waits for the last asynchronous save
        ckpts.close()
        writer.flush()

    summary: dict[str, Any] = {"step": step, "total_steps": total, "preempted": preempted}
    history = eval_history(workdir) if is_main else {}
    if history:
        ordered = list(history.values())
        used = ordered[-config.median_evals:]
        summary["last_eval"] = ordered[-1]
        # The paper's figure; how many evaluations it covers is part of the record.
        summary["median_top1_error"] = paper_error([r["top1_error"] for r in used],
                                                   last=config.median_evals)
        summary["median_num_evals"] = len(used)
        summary["median_eval_epochs"] = [round(r["epoch"], 4) for r in used]
    if preempted:
        log(f"preempted: checkpoint saved at step {step}; run the same command again to resume")
    elif step >= total and is_main:
        writer.write("result", step, **{k: v for k, v in summary.items()
                                        if k not in ("step", "last_eval")})
        if "median_top1_error" in summary:
            n, epochs = summary["median_num_evals"], summary["median_eval_epochs"]
            short = "" if n >= 5 else f"; only {n}, fewer than the paper's 5"
            log(f"done: {step} steps. Result (the paper's metric, the median top-1 error of "
                f"the last {plural(n, 'evaluation')}, at epochs "
                f"{', '.join(f'{e:g}' for e in epochs)}{short}): "
                f"{100 * summary['median_top1_error']:.2f}%. Last evaluation: "
                f"{100 * summary['last_eval']['top1_error']:.2f}%.")
    writer.close()
    return summary


def main_guard(fn: Callable[[], Any], workdir: str | None = None) -> int:
    """Run ``fn``; turn configuration and data errors into a message and exit status 2."""
    try:
        fn()
    except (ValueError, FileNotFoundError, NonFiniteError) as e:
        text = str(e)
        if "No space left on device" in text or "RESOURCE_EXHAUSTED" in text:
            # orbax/tensorstore report a full disk as a ValueError with a long path.
            text = ("no space left on the device while saving a checkpoint "
                    f"({text.splitlines()[0][:300]}); free some space and rerun the same "
                    "command: it resumes from the latest complete checkpoint")
        print(f"error: {text}", file=sys.stderr, flush=True)
        return 2 if not isinstance(e, NonFiniteError) else 3
    except KeyboardInterrupt:
        print("aborted by a second Ctrl-C; rerun the same command to resume from the latest "
              "complete checkpoint", file=sys.stderr, flush=True)
        return 130
    except OSError as e:
        if e.errno != errno.ENOSPC and "No space left" not in str(e):
            raise
        where = e.filename or workdir or "the workdir"
        print(f"error: no space left on the device of {where}; free some space and rerun the "
              "same command: it resumes from the latest complete checkpoint",
              file=sys.stderr, flush=True)
        return 2
    return 0
