"""The training loop: ``train_and_evaluate(config, workdir)``.

One function for one GPU, one node or many hosts (every process runs it with the
same config). ``_prepare`` builds the mesh, the data sources, the Plan (every check,
before compiling), the model, the optimizer and the state (fresh or the latest
verified checkpoint); ``_loop`` trains (metrics of step t are read while step t+1
runs, so the devices never wait for the host; ``LogWindow`` logs, ``Saver`` saves,
both in ``lsgd_jax.training.recording``; ``evaluate`` evaluates); ``_result`` records the
paper's figure (the median top-1 error of the last 5/90 of the run). A workdir
with progress but no usable checkpoint is never silently restarted
(``_start_without_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lsgd_jax.engine.step import create_train_state, make_eval_step, make_train_step
from lsgd_jax.models import get_model
from lsgd_jax.parallel.agreement import exchange, from_process_0
from lsgd_jax.parallel.distributed import InFlight, data_sharding, make_mesh
from lsgd_jax.parallel.failures import decided_together
from lsgd_jax.training.checkpoint import (
    Checkpoints,
    NoUsableCheckpointError,
    check_data,
    check_resumable,
    list_corrupt,
)
from lsgd_jax.training.config import TrainConfig, flag_of
from lsgd_jax.training.environment import describe_environment
from lsgd_jax.training.library_logs import LibraryLog, diverted
from lsgd_jax.training.metrics import (
    MetricsWriter,
    current_records,
    eval_history,
    paper_error,
    plural,
)
from lsgd_jax.training.plan import make_plan, plan_warnings
from lsgd_jax.training.preemption import PreemptionWatcher
from lsgd_jax.training.recipe import build as build_recipe
from lsgd_jax.training.recording import LogWindow, NonFiniteError, Saver  # noqa: F401 (re-exported)
from lsgd_jax.training.run import Run
from lsgd_jax.training.workdir import WorkdirError, WorkdirLock, check_free_space


# ------------------------------------------------------------------ the loop
def train_and_evaluate(config: TrainConfig, workdir: str, *,
                       log: Callable[[str], None] | None = None,
                       restart_from_scratch: bool = False) -> dict:
    """Train and evaluate ``config`` in ``workdir``, resuming from its latest checkpoint.

    A workdir that holds a run's progress (checkpoints, or their records) but no
    checkpoint that can be resumed is refused, unless ``restart_from_scratch``:
    then the run starts over, keeping the old records and marking the restart in
    ``metrics.jsonl``.

    Returns a summary dict (final step, last eval, the paper's figure when
    available, and whether the run stopped for preemption).

    Raises:
      ValueError: bad configuration (before anything is compiled); WorkdirError, a
        ValueError, when the workdir is in use by another run, is not a writable
        directory or has no room for a checkpoint; LockLostError, a WorkdirError,
        when another run took the workdir over from this one.
      CheckpointError: a checkpoint could not be read (and is not proven damaged), a
        save did not complete, or no checkpoint of the run's progress can be resumed.
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
    error = from_process_0(error)
    if error:
        raise WorkdirError(error)
    if note:
        log(f"{workdir}: {note}")
    name = "orbax.log" if is_main else f"orbax.process-{jax.process_index()}.log"
    try:
        with diverted(os.path.join(workdir, name)) as library_log:
            return _train_and_evaluate(config, workdir, log, lock, restart_from_scratch,
                                       library_log)
    finally:
        if lock is not None:
            lock.release()


# ------------------------------------------------------------------ one run
def _prepare(config: TrainConfig, workdir: str, log: Callable[[str], None],
             lock: WorkdirLock | None = None, restart_from_scratch: bool = False) -> Run:
    """Mesh, data, plan, model, optimizer and state (fresh or resumed); checks first."""
    from lsgd_jax.data import open_source

    mesh = make_mesh()
    _agree("recipe", {k: v for k, v in config.to_dict().items() if k not in PER_PROCESS})
    resumable = check_resumable(os.path.join(workdir, "checkpoints"), config.to_dict())
    where = dict(workdir=workdir, process_index=jax.process_index(),
                 process_count=jax.process_count(), log=log, exchange=exchange)
    train_source = open_source(config, "train", **where)
    eval_source = open_source(config, "validation", **where)
    data = {s.identity["split"]: s.identity for s in (train_source, eval_source)
            if getattr(s, "identity", None)}
    _agree("data", data)
    check_data(os.path.join(workdir, "checkpoints"), data, config.data_dir)
    plan = make_plan(config, num_train_examples=train_source.num_examples,
                     num_devices=mesh.devices.size, num_processes=jax.process_count())
    for line in plan_warnings(config, plan):
        log(line)
    # The model and the step are built from the same n and dtype: the plan's and the config's.
    model = get_model(config.model, num_classes=config.num_classes or train_source.num_classes,
                      dtype=config.dtype,
                      bn_group_size=plan.bn_group_size,
                      zero_init_residual=config.zero_init_residual, **config.levers())
    schedule, tx = build_recipe(config, plan)  # --schedule and --optimizer
    checked = None
    if config.init_from and (resumable is None or restart_from_scratch):
        # A run that starts at step 0 reads the model file: check it before compiling.
        from lsgd_jax.training.init_from import check_init_from

        checked = check_init_from(config.init_from, model, model_name=config.model, log=log,
                                  input_shape=(1, *train_source.image_shape))
    os.makedirs(workdir, exist_ok=True)
    state = create_train_state(model, tx, rng=jax.random.key(config.seed),
                               input_shape=(1, *train_source.image_shape), mesh=mesh)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    error = check_free_space(workdir, state_bytes) if jax.process_index() == 0 else ""
    error = from_process_0(error)
    if error:
        raise WorkdirError(error)
    ckpts = Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                        keep_period=config.keep_every_epochs * plan.steps_per_epoch)
    run = Run(config=config, workdir=workdir, log=log, plan=plan, mesh=mesh,
               train_source=train_source, eval_source=eval_source, model=model,
               schedule=schedule, tx=tx, state=state, ckpts=ckpts, lock=lock, data=data)
    had_steps = ckpts.latest_step() is not None
    try:
        restored = ckpts.restore_latest(state, config=config.to_dict(), log=log)
    except BaseException:
        ckpts.close()
        raise
    if restored is not None:
        run.state, data_item, _, latest = restored
        if restart_from_scratch:
            ckpts.close()
            raise NoUsableCheckpointError(
                f"--restart-from-scratch: checkpoint {ckpts.directory}/{latest} is intact; "
                "rerun without the flag to resume it, or give a new --workdir to start "
                "another run; nothing was changed")
        run.position = data_item["position"]
        # Said once the run is known not to be finished (_train_and_evaluate).
        run.resuming = (f"resuming from {ckpts.directory}/{latest} (epoch "
                        f"{run.position['epoch']}, step {run.position['step']} of the epoch; "
                        "its state SHA-256 verified)")
        return run
    _start_without_checkpoint(run, had_steps, restart_from_scratch)
    if config.init_from and run.finished is None:
        # Fine-tuning: the file's weights, a fresh optimizer and schedule.
        from lsgd_jax.training.init_from import start_from_model

        run.log(f"initialising from {config.init_from}")
        run.state = start_from_model(run.state, config.init_from, model_name=config.model,
                                     log=log, checked=checked)
    return run


# Fields that may differ between the processes of one run: where each reads its data,
# and how many threads or processes decode it.
PER_PROCESS = frozenset({"data_dir", "val_labels", "decode_threads", "decode_workers",
                         "init_from"})


def _agree(what: str, mine: dict) -> None:
    """Every process compares its ``mine`` with process 0's; on a difference all of them
    raise the same error, naming the first process and field that differ and both values,
    before anything is compiled or written."""
    with decided_together():  # every process raises the same error: each reports its own
        _compare(what, exchange(what, mine))


def _compare(what: str, values: list[dict]) -> None:
    for index, theirs in enumerate(values[1:], start=1):
        for key in sorted(set(values[0]) | set(theirs)):
            a, b = values[0].get(key), theirs.get(key)
            if a == b:
                continue
            if what == "recipe":
                name = {f.name: flag_of(f) for f in dataclasses.fields(TrainConfig)}[key]
                raise ValueError(
                    f"process {index} was started with {name} {b!r}, process 0 with {a!r}: "
                    "every process of a run must be given the same flags (only "
                    f"{', '.join('--' + f.replace('_', '-') for f in sorted(PER_PROCESS))} "
                    "may differ); nothing was written")
            raise ValueError(
                f"process {index} reads other {key} data than process 0: "
                + (f"{b['examples']:,} examples, fingerprint {b['fingerprint']}, against "
                   f"{a['examples']:,}, fingerprint {a['fingerprint']}" if a and b else
                   f"{b!r} against {a!r}")
                + f" ({(a or b)['what']}). Give every process the same data (a copy of it "
                "is fine); nothing was written")


class Start(enum.Enum):
    """What a run does when no checkpoint can be resumed (``_start_without_checkpoint``)."""

    FRESH = "fresh"          # nothing was saved: start from step 0
    RESTART = "restart"      # an earlier attempt saved nothing (or --restart-from-scratch)
    FINISHED = "finished"    # the run had finished: its result stands
    REFUSE = "refuse"        # progress was saved and would be lost: stop, change nothing


@dataclasses.dataclass(frozen=True)
class StartVerdict:
    """Process 0's reading of the workdir, shared with every process."""

    start: Start
    why: str = ""                 # RESTART's reason, REFUSE's error
    result: dict | None = None    # FINISHED's result record

    def to_json(self) -> dict:
        return {"start": self.start.value, "why": self.why, "result": self.result}

    @classmethod
    def from_json(cls, value: dict) -> StartVerdict:
        return cls(Start(value["start"]), value["why"], value["result"])


def _start_without_checkpoint(run: Run, had_steps: bool, restart_from_scratch: bool) -> None:
    """No checkpoint can be resumed: start from scratch only when that loses nothing.

    Progress was saved when the run had checkpoints, ``checkpoint`` or ``result``
    records, or ``corrupt-*`` folders; then the run refuses (a finished run says
    so), unless ``--restart-from-scratch``. Records of an attempt that never saved
    a checkpoint lose nothing: that attempt is restarted, and the restart marked.
    Process 0 reads the files; every process acts on its verdict.
    """
    directory = run.ckpts.directory
    verdict = StartVerdict(Start.FRESH)
    if jax.process_index() == 0:
        verdict = _read_workdir(run, had_steps, restart_from_scratch)
    verdict = StartVerdict.from_json(from_process_0(verdict.to_json(), "start_verdict"))
    if verdict.start is Start.FINISHED:
        run.finished = verdict.result
    elif verdict.start is Start.REFUSE:
        run.ckpts.close()
        raise NoUsableCheckpointError(verdict.why)
    elif verdict.start is Start.RESTART:
        run.restart = verdict.why
        run.log(f"no checkpoint in {directory}: {verdict.why}; starting from scratch (the "
                "earlier records are kept in metrics.jsonl)")
    else:
        run.log(f"no checkpoint in {directory}: starting from scratch")


def _read_workdir(run: Run, had_steps: bool, restart_from_scratch: bool) -> StartVerdict:
    """Process 0's verdict on a workdir without a checkpoint to resume."""
    directory = run.ckpts.directory
    records = current_records(run.workdir)
    corrupt = list_corrupt(directory)
    result = [r for r in records if r.get("kind") == "result"]
    saved = had_steps or corrupt or result or any(
        r.get("kind") == "checkpoint" for r in records)
    if restart_from_scratch:
        return StartVerdict(Start.RESTART, "restarted with --restart-from-scratch") if (
            records) else StartVerdict(Start.FRESH)
    if result and int(result[-1]["step"]) >= run.plan.total_steps:
        return StartVerdict(Start.FINISHED, result=result[-1])
    if saved:
        last = max((int(r["step"]) for r in records if r.get("kind") == "checkpoint"),
                   default=None)
        return StartVerdict(Start.REFUSE, (
            f"no checkpoint in {directory} can be resumed, but this workdir holds a run's "
            "progress (" + (f"checkpoints up to step {last} were recorded" if last else
                            "it had checkpoints")
            + (f"; damaged ones were moved to {', '.join(corrupt)} in {directory}"
               if corrupt else "")
            + "). Nothing was deleted. To train again from step 0 in this workdir, "
            "keeping the old records, add --restart-from-scratch; or give a new "
            "--workdir"))
    if records:
        last = max((int(r["step"]) for r in records), default=0)
        return StartVerdict(Start.RESTART, f"the earlier attempt stopped at step {last} "
                                           "before saving any checkpoint")
    return StartVerdict(Start.FRESH)


def _train_and_evaluate(config: TrainConfig, workdir: str, log: Callable[[str], None],
                        lock: WorkdirLock | None = None,
                        restart_from_scratch: bool = False,
                        library_log: LibraryLog | None = None) -> dict:
    run = _prepare(config, workdir, log, lock, restart_from_scratch)
    run.library_log = library_log
    plan, is_main = run.plan, jax.process_index() == 0
    if run.finished is not None:  # its checkpoints are gone, its result is not
        run.ckpts.close()
        return _already_finished(run, int(run.finished.get("step", 0)), run.finished)
    step = int(jax.device_get(run.state.step))
    done = current_records(workdir, "result") if step >= plan.total_steps else []
    # Process 0 writes metrics.jsonl: its reading decides for every process.
    if from_process_0("finished" if done else "") == "finished":
        run.ckpts.close()
        return _already_finished(run, step, done[-1] if done else {})
    if run.resuming:
        log(run.resuming)
    writer = MetricsWriter(workdir, enabled=is_main, guard=run.lock.check if run.lock else None,
                           log=log)
    run.check_lock()
    if run.restart:
        writer.write("restart", step, reason=run.restart,
                     corrupt=list_corrupt(run.ckpts.directory))
    # What made this attempt (a rerun is bit-identical only in the same environment).
    environment = describe_environment(jax.devices()) if is_main else {}
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump({"config": config.to_dict(), "plan": plan.to_dict(),
                       "environment": environment}, f, indent=2, sort_keys=True)
    log(f"config (every field: {os.path.join(workdir, 'config.json')}):\n"
        + "\n".join(f"  {line}" for line in config.summary()))
    log(plan.describe(config.warmup))
    defaults = TrainConfig().levers()
    changed = {k: v for k, v in config.levers().items() if v != defaults[k]}
    if changed:
        log("speed switches (the same results, computed another way): "
            + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items()))
    writer.write("start", step, environment=environment,
                 **{k: v for k, v in plan.to_dict().items() if not isinstance(v, list)})
    try:
        step, preempted = _loop(run, writer, step)
        return _result(run, writer, step, preempted)
    finally:
        writer.close()  # also on errors: TensorBoard's files are closed by us, not at exit


def _already_finished(run: Run, step: int, result: dict) -> dict:
    """A rerun of a finished run: nothing to do, nothing to record."""
    figure = result.get("median_top1_error")
    run.log(f"already finished at step {step} of {run.plan.total_steps}"
            + (f": result {100 * figure:.2f}% top-1 error" if figure is not None else "")
            + ". Nothing to do; use a new --workdir for a new run.")
    run.log(outputs_line(run.workdir))
    return {"step": step, "total_steps": run.plan.total_steps, "preempted": False,
            **{k: v for k, v in result.items() if k not in ("kind", "step", "time")}}


# ------------------------------------------------------------------ evaluation
def evaluate(eval_step: Callable, state, source, *, global_batch_size: int, mesh,
             decode_workers: int = 0, log=None) -> dict:
    """Top-1/top-5 error and loss over every example of ``source`` (masked padding), its
    images decoded by ``decode_workers`` worker processes (0: this process's threads)."""
    from lsgd_jax.data import eval_stream

    batches = eval_stream(source, global_batch_size=global_batch_size,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          decode_workers=decode_workers, log=log)
    try:
        return _evaluate(eval_step, state, batches, mesh)
    finally:
        getattr(batches, "close", lambda: None)()


def _evaluate(eval_step: Callable, state, batches, mesh) -> dict:
    from lsgd_jax.parallel.prefetch import prefetch_to_mesh

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


# ------------------------------------------------------------------ the loop
def _steps(run: Run):
    """The run's train and eval steps, from its plan's kn, n and K and its config."""
    config, plan = run.config, run.plan
    pixel_stats = dict(pixel_mean=run.train_source.pixel_mean,
                       pixel_std=run.train_source.pixel_std)
    train_step = make_train_step(run.model, run.tx, run.mesh,
                                 global_batch_size=plan.global_batch_size,
                                 bn_group_size=plan.bn_group_size,
                                 grad_accum_steps=plan.grad_accum_steps,
                                 allreduce=config.allreduce, dtype=config.dtype,
                                 label_smoothing=config.label_smoothing, **pixel_stats)
    return train_step, make_eval_step(run.model, run.mesh, **pixel_stats)


def _loop(run: Run, writer: MetricsWriter, step: int) -> tuple[int, bool]:
    """Train from ``step`` to the end (or a preemption); returns the last step and whether
    the run was preempted. Metrics of step t are read while step t+1 runs."""
    from lsgd_jax.data import decode_workers_of, train_stream
    from lsgd_jax.parallel.prefetch import prefetch_to_mesh

    config, plan, state = run.config, run.plan, run.state
    train_step, eval_step = _steps(run)
    iterator = train_stream(run.train_source, config, global_batch_size=plan.global_batch_size,
                            process_index=jax.process_index(),
                            process_count=jax.process_count(), position=run.position,
                            log=run.log, exchange=exchange)
    prefetch = prefetch_to_mesh(iterator, data_sharding(run.mesh), size=2)
    preemption, saver, window = PreemptionWatcher(run.log), Saver(run, writer), LogWindow(
        run, writer, step)
    window.input_wait = lambda: prefetch.wait_seconds
    last_eval_step = max((int(r["step"]) for r in eval_history(run.workdir).values()), default=-1)
    eval_steps, spe, preempted, pending = set(plan.eval_steps), plan.steps_per_epoch, False, None
    try:
        first = step < plan.total_steps
        while step < plan.total_steps:
            batch = next(prefetch)
            if first:
                run.log("compiling the train step (the first step includes it)…")
                t_first = time.time()
            state, metrics = train_step(state, batch)
            step += 1
            if first:  # wait for it: the compile time is worth knowing
                jax.block_until_ready(metrics)
                run.log(f"first step done in {time.time() - t_first:.1f} s (compilation "
                        "included)")
                first = False
                window.restart(step, t_first)
                window.add(step, metrics)
            else:
                if pending is not None:  # read step t-1 while step t runs
                    window.add(*pending)
                pending = (step, metrics)
            preempted = preemption.reached(step)
            save_now = (step % spe == 0 or step == plan.total_steps or preempted or (
                config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0))
            eval_now = step in eval_steps
            if (save_now or eval_now or step % config.log_every_steps == 0) and pending:
                window.add(*pending)
                pending = None
            if step % config.log_every_steps == 0 or save_now:
                window.emit(step)
            saver.record_committed()
            if save_now:
                saver.save(step, state, prefetch.position)
            if eval_now and step != last_eval_step:
                _log_eval(run, writer, step, evaluate(
                    eval_step, state, run.eval_source, global_batch_size=plan.eval_batch_size,
                    mesh=run.mesh, decode_workers=decode_workers_of(config), log=run.log))
                last_eval_step = step
            if preempted:
                break
        if pending is not None:
            window.add(*pending)
    except BaseException:
        # This process fails alone: its peers are inside the step's collectives (or on
        # their way), so its clean-up must not enter another one (see lsgd_jax.parallel.failures).
        alone = jax.process_count() > 1
        raise
    else:
        alone = False
    finally:
        prefetch.close()
        iterator.close()
        preemption.close()
        if alone:
            writer.flush()
        else:
            try:
                saver.record_committed(wait=True)  # waits for the last asynchronous save
            finally:
                run.ckpts.close()
                writer.flush()
    return step, preempted


def _log_eval(run: Run, writer: MetricsWriter, step: int, result: dict) -> None:
    spe = run.plan.steps_per_epoch
    writer.write("eval", step, epoch=step / spe, **result)
    run.log(f"eval at step {step} (epoch {step / spe:.2f}): top-1 error "
            f"{100 * result['top1_error']:.2f}%, top-5 error "
            f"{100 * result['top5_error']:.2f}% over {result['count']} images")


# ------------------------------------------------------------------ the result
def _result(run: Run, writer: MetricsWriter, step: int, preempted: bool) -> dict:
    """The summary; at the end of a run, its ``result`` record (the paper's figure)."""
    total, n_median = run.plan.total_steps, run.config.median_evals
    summary: dict[str, Any] = {"step": step, "total_steps": total, "preempted": preempted}
    is_main = jax.process_index() == 0
    history = eval_history(run.workdir) if is_main else {}
    if history:
        ordered = list(history.values())
        used = ordered[-n_median:]
        summary["last_eval"] = ordered[-1]
        # The paper's figure; how many evaluations it covers is part of the record.
        summary["median_top1_error"] = paper_error([r["top1_error"] for r in used],
                                                   last=n_median)
        summary["median_num_evals"] = len(used)
        summary["median_eval_epochs"] = [round(r["epoch"], 4) for r in used]
    if preempted:
        run.log(f"preempted: checkpoint saved at step {step}; run the same command again to "
                "resume")
    elif step >= total and is_main:
        writer.write("result", step, **{k: v for k, v in summary.items()
                                        if k not in ("step", "last_eval")})
        if "median_top1_error" in summary:
            n, epochs = summary["median_num_evals"], summary["median_eval_epochs"]
            short = "" if n >= 5 else f"; only {n}, fewer than the paper's 5"
            run.log(f"done: {step} steps. Result (the paper's metric, the median top-1 error of "
                    f"the last {plural(n, 'evaluation')}, at epochs "
                    f"{', '.join(f'{e:g}' for e in epochs)}{short}): "
                    f"{100 * summary['median_top1_error']:.2f}% top-1 error. Last evaluation: "
                    f"{100 * summary['last_eval']['top1_error']:.2f}% top-1 error.")
    writer.close()
    if step >= total or preempted:
        run.log(outputs_line(run.workdir))
    return summary


def outputs_line(workdir: str) -> str:
    """The last line of a run: what its workdir holds, and the commands that read it."""
    from lsgd_jax.training.extras import available, install_command

    names = [name + ("/" if os.path.isdir(os.path.join(workdir, name)) else "")
             for name in ("metrics.jsonl", "config.json", "checkpoints", "tensorboard",
                          "orbax.log")
             if os.path.exists(os.path.join(workdir, name))]
    viewer = f"tensorboard --logdir {os.path.join(workdir, 'tensorboard')}"
    if not available("tensorboard"):
        viewer += f" (after {install_command('tensorboard')})"
    curves = f"lsgd-jax curves {workdir}"
    if not available("matplotlib"):
        curves += f" (after {install_command('plot')})"
    return (f"outputs in {workdir}: {', '.join(names)}. Curves: {curves}; TensorBoard: "
            f"{viewer}")
