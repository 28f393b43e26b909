"""The training loop: ``train_and_evaluate(config, workdir)``.

Reads top to bottom: mesh and config checks, input, model and head, restore or
initialize, compile, loop (step, log, checkpoint), finish.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import pathlib
import signal

import jax
import ml_collections
import numpy as np
from flax import nnx

from pfc_jax import checkpoint, evaluation, heads, models, optim, sharding
from pfc_jax.config_validation import validate, validate_run_length
from pfc_jax.data import pipeline
from pfc_jax.data.augment import Augment
from pfc_jax.data.sources import SourceError, make_source
from pfc_jax.errors import RunError
from pfc_jax.inference import Embedder
from pfc_jax.models import ModelSpec
from pfc_jax.reporting import Reporter
from pfc_jax.step import TrainState, TrainStep
from pfc_jax.workdir import WorkdirLock


class TrainingDiverged(RunError):
    """The loss became NaN/Inf; the message names the step, the last good checkpoint and fixes."""


def make_data(config, source):
    """This process's batches of ``source`` per ``config.data`` (see pfc_jax.data.pipeline)."""
    d, need = config.data, heads.requirements(config)
    return pipeline.make_iterator(
        source,
        global_batch=config.global_batch_size,
        seed=config.seed,
        image_size=d.image_size,
        augment=Augment(**d.augment.to_dict()),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        threads=d.threads,
        workers=d.workers,
        sampler=need.sampler,
        images_per_identity=need.images_per_identity,
        identity_fraction=d.identity_fraction,
    )


def run_length(config, num_examples: int) -> tuple[int, int]:
    """(total_steps, warmup_steps) from the config and the dataset size."""
    steps_per_epoch = num_examples / config.global_batch_size
    total = config.total_steps or int(math.ceil(config.num_epochs * steps_per_epoch))
    warmup = int(round(config.schedule.warmup_epochs * steps_per_epoch))
    return total, warmup


@dataclasses.dataclass
class Setup:
    """Everything built from a config before the state exists. The backbone's initial
    weights are made on first use of ``params`` / ``batch_stats``, so that the step can be
    compiled (from the abstract state) meanwhile."""

    trainer: TrainStep
    spec: ModelSpec
    seed: int
    num_params: int
    total_steps: int
    warmup_steps: int
    meta: dict  # written with every checkpoint

    @functools.cached_property
    def _initial(self) -> tuple[dict, dict]:
        _, params, batch_stats = nnx.split(models.init(self.spec, self.seed), nnx.Param, nnx.BatchStat)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)

    @property
    def params(self) -> dict:
        """Initial backbone parameters."""
        return self._initial[0]

    @property
    def batch_stats(self) -> dict:
        """Initial BatchNorm statistics."""
        return self._initial[1]


def build(config, mesh, *, num_classes: int, num_examples: int) -> Setup:
    """Model, head, optimizers and the step for ``config`` on ``mesh``."""
    total_steps, warmup_steps = run_length(config, num_examples)
    validate_run_length(config, total_steps=total_steps, warmup_steps=warmup_steps)
    spec = ModelSpec.from_config(config)
    model = nnx.eval_shape(lambda: spec.create(config.seed))  # shapes only: no compute yet
    lr = optim.schedule(
        config,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        steps_per_epoch=num_examples / config.global_batch_size,
    )
    head = heads.HEADS[config.head.name].build(config, mesh, num_classes=num_classes, learning_rate=lr)
    need = heads.requirements(config)
    trainer = TrainStep.for_model(
        model,
        head,
        optim.backbone_optimizer(config, lr),
        lr,
        grad_accum_steps=config.grad_accum_steps,
        dtype=spec.compute_dtype,
        ema_momentum=need.ema_momentum if need.ema else None,
    )
    meta = {
        "model": spec.to_dict(),
        "head": config.head.name,
        "optimizer": config.optimizer.name,
        "num_classes": num_classes,
        "num_devices": mesh.size,
        "global_batch_size": config.global_batch_size,
        "total_steps": total_steps,
        "ema": need.ema,  # the checkpoints hold an "ema" item
        "eval_encoder": need.eval_encoder,  # what evaluate / embed / export read by default
    }
    return Setup(trainer, spec, config.seed, models.count_params(model), total_steps, warmup_steps, meta)


class _Preemption:
    """SIGTERM -> save and exit, at a step every process agrees on.

    One process: a handler turns the signal into a flag the loop polls. Several: the
    save is collective, so they must all stop after the same step although the signal
    reaches them at different times (or only some of them). JAX's preemption sync manager,
    started by ``jax.distributed.initialize``, catches SIGTERM in any process and picks
    the first step every process can still reach.
    """

    def __init__(self):
        self.requested = False
        self._synced = jax.process_count() > 1
        if not self._synced:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        """True when the loop should save and exit after ``step`` (called at every step)."""
        if self._synced:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        if not self._synced:
            signal.signal(signal.SIGTERM, self._previous)


def _abstract_batch(config, mesh):
    """Shapes and shardings of one global batch (images uint8, labels int32)."""
    batch, size = sharding.batch_sharding(mesh), config.data.image_size
    return (
        jax.ShapeDtypeStruct((config.global_batch_size, size, size, 3), np.uint8, sharding=batch),
        jax.ShapeDtypeStruct((config.global_batch_size,), np.int32, sharding=batch),
    )


def _in_background(work):
    """``work()`` on a thread of its own; ``.result()`` waits for it (and re-raises)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pfc_jax-compile")
    future = pool.submit(work)
    pool.shutdown(wait=False)
    return future


def _global_batch(mesh, images: np.ndarray, labels: np.ndarray):
    batch = sharding.batch_sharding(mesh)
    return (
        jax.make_array_from_process_local_data(batch, images),
        jax.make_array_from_process_local_data(batch, labels),
    )


def _check_restored(meta: dict, setup: Setup, step: int, directory) -> None:
    """Refuses a checkpoint written for another dataset, model, head, optimizer or batch."""
    where = f"checkpoint step {step} in {directory}"
    for key, field in (("num_classes", "the dataset"), ("global_batch_size", "config.global_batch_size")):
        if key in meta and meta[key] != setup.meta[key]:
            raise checkpoint.CheckpointError(
                f"{where} was written with {key}={meta[key]}, this run has {setup.meta[key]} "
                f"(use the same {field}, or a new --workdir)"
            )
    saved = checkpoint.read_spec(meta)
    if not saved.same_network(setup.spec):
        raise checkpoint.CheckpointError(
            f"{where} was written by model {saved}, this config builds {setup.spec} "
            "(use the same config.model and config.data.image_size, or a new --workdir)"
        )
    for key, default in (("head", "partial_fc"), ("optimizer", None)):  # 0.1.0 recorded neither
        written = meta.get(key, default)
        if written is not None and written != setup.meta[key]:
            raise checkpoint.CheckpointError(
                f"{where} was written with {key} {written!r}, this config uses {setup.meta[key]!r} "
                f"(set --config.{key}.name={written}, or use a new --workdir)"
            )


class _Imported(Exception):
    """The newest checkpoint of the run's own workdir is an imported one (pfc_jax.convert)."""

    def __init__(self, meta: dict):
        self.meta = meta


def _check(meta: dict, setup: Setup, step: int, probe) -> None:
    if checkpoint.is_imported(meta):
        raise _Imported(meta)
    _check_restored(meta, setup, step, probe.directory)


def _start_from(source: pathlib.Path, config, setup: Setup, *, centers: bool) -> tuple[TrainState, str]:
    """A new state whose backbone (and with ``centers`` class centers) come from the latest
    checkpoint of ``source``; optimizer states fresh. Raises CheckpointError when they
    don't fit this run."""
    initial = checkpoint.read_initial(source, centers=centers)
    got, want = initial.spec, setup.spec
    if (got.name, got.embedding_dim, got.image_size) != (want.name, want.embedding_dim, want.image_size):
        raise checkpoint.CheckpointError(
            f"{initial.source} holds {got.name} ({got.embedding_dim}-d, {got.image_size}px), this config builds "
            f"{want.name} ({want.embedding_dim}-d, {want.image_size}px) (set config.model.name, "
            "config.model.embedding_dim and config.data.image_size to match it)"
        )
    trainer = setup.trainer
    state = trainer.init(initial.params, initial.batch_stats, jax.random.key(config.seed))
    if initial.centers is None:
        return state, f"initialized from {initial.source} (backbone; head fresh)"
    num_classes = setup.meta["num_classes"]
    if initial.centers.shape[0] != num_classes:
        raise checkpoint.CheckpointError(
            f"{initial.source} holds {initial.centers.shape[0]:,} class centers, this run's dataset has "
            f"{num_classes:,} classes (use the dataset the centers were trained on, or start the head fresh: "
            "config.init_from_centers=False, or convert without --centers)"
        )
    if not hasattr(trainer.head, "init_from_centers"):
        raise checkpoint.CheckpointError(
            f"head {config.head.name} keeps no class centers to load from {initial.source} "
            "(use head.name=partial_fc, or start the head fresh)"
        )
    state = state._replace(head=trainer.head.init_from_centers(initial.centers))
    return state, f"initialized from {initial.source} (backbone and {num_classes:,} class centers)"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains per ``config``, resuming from ``workdir`` if it holds a checkpoint.

    The workdir is locked for the run (:class:`pfc_jax.workdir.WorkdirLock`). Until the
    run is known to start (config valid, data and pair sets readable, checkpoint restored
    or none there), nothing in the workdir changes; a workdir this call created is
    removed again when the start is refused.
    """
    mesh = sharding.make_mesh()
    validate(config, num_devices=mesh.size)
    workdir = pathlib.Path(workdir).absolute()
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    started = False
    try:
        with WorkdirLock(workdir, jax.process_index()):

            def on_start():
                nonlocal started
                started = True

            return _train(config, workdir, mesh, on_start)
    finally:
        if created and not started:
            try:
                workdir.rmdir()  # only if empty; another process may have removed it already
            except OSError:
                pass


def _train(config, workdir: pathlib.Path, mesh, on_start) -> TrainState:
    lead = jax.process_index() == 0
    say = (lambda text: print(text, flush=True)) if lead else (lambda text: None)
    say(f"config:\n{config}")

    # ---- Input -------------------------------------------------------------------------
    source = make_source(config.data)
    loader = make_data(config, source)

    # ---- Model, head, optimizers -------------------------------------------------------
    say(f"building {config.model.name} and the {config.head.name} head ...")
    setup = build(config, mesh, num_classes=source.num_classes, num_examples=len(source))
    trainer = setup.trainer
    end_step = config.stop_at_step or setup.total_steps

    # ---- Compile (once, ahead of time), in the background while the rest gets ready ------
    say("compiling the train step (once, in the background) ...")
    compiling = _in_background(
        lambda: trainer.jit().lower(trainer.abstract_state, *_abstract_batch(config, mesh)).compile()
    )

    # ---- Evaluators (pair files loaded now: a bad one stops before anything is written) ----
    pair_sets = evaluation.make_pair_sets(config, defer_synthetic=True)

    # ---- Restore (the newest readable checkpoint) or initialize -------------------------
    directory = workdir / "checkpoints"
    restored = imported = None
    if directory.is_dir():
        probe = checkpoint.Checkpointer(directory, read_only=True)
        try:
            restored = probe.restore_latest(trainer.abstract_state, lambda meta, step: _check(meta, setup, step, probe))
        except _Imported as e:
            imported = e.meta  # a converted workdir: a starting point, not a run to resume
        finally:
            probe.close()
    if restored is not None:
        latest, state, data_state, _ = restored
        loader.restore(data_state)
        what = f"resumed from checkpoint step {latest}"
    else:
        latest = None
        if imported is not None or config.init_from:
            start = workdir if imported is not None else pathlib.Path(config.init_from)
            centers = bool(imported.get("num_classes")) if imported is not None else config.init_from_centers
            state, what = _start_from(start, config, setup, centers=centers)
        else:
            state = trainer.init(setup.params, setup.batch_stats, jax.random.key(config.seed))
            what = "initialized a new run"
    start_step = int(jax.device_get(state.step))

    # ---- The run starts: from here on it writes to the workdir ------------------------
    on_start()
    if lead:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    reporter = Reporter(
        workdir,
        total_steps=setup.total_steps,
        start_step=start_step,
        global_batch=config.global_batch_size,
        enabled=lead,
        tensorboard=config.tensorboard,
    )
    ckpt = checkpoint.Checkpointer(
        directory, keep=config.keep_checkpoints, on_saved=lambda step: reporter.message(f"checkpoint {step} saved")
    )
    reporter.message(
        f"{what} in {workdir}: {config.model.name} ({setup.num_params:,} parameters), "
        f"{source.num_classes:,} classes on {mesh.size} device(s) "
        + (f"in {jax.process_count()} processes " if jax.process_count() > 1 else "")
        + f"({trainer.head.describe(config.global_batch_size)}), {len(source):,} images, "
        f"steps {start_step} -> {end_step} of {setup.total_steps}"
    )
    if start_step >= end_step:
        reporter.message(f"nothing to do: the checkpoint is at step {start_step}")
        reporter.close()
        ckpt.close()
        loader.close()
        return state

    embedder = None
    if pair_sets:
        model = nnx.merge(trainer.graphdef, setup.params, setup.batch_stats)
        embedder = Embedder(model, batch_size=config.eval.batch_size, mesh=mesh)

    images, labels = _global_batch(mesh, *next(loader))
    compiled = compiling.result()
    memory = compiled.memory_analysis()
    if memory is not None:
        reporter.message(
            "compiled step, per device: "
            f"arguments {memory.argument_size_in_bytes / 2**20:,.1f} MiB, "
            f"temporaries {memory.temp_size_in_bytes / 2**20:,.1f} MiB, "
            f"outputs {memory.output_size_in_bytes / 2**20:,.1f} MiB "
            f"(aliased to inputs {memory.alias_size_in_bytes / 2**20:,.1f} MiB)"
        )

    # ---- Loop ------------------------------------------------------------------------------
    preemption = _Preemption()
    reporter.reset_clock(start_step)
    last_saved = latest
    step = start_step
    try:
        for step in range(start_step + 1, end_step + 1):
            # `images, labels` are batch `step`; the loader already points at the next one.
            data_position = loader.state()
            state, metrics = compiled(state, images, labels)
            # Read the flag once: a SIGTERM arriving later in this iteration is handled
            # (saved, then exit) in the next one.
            preempted = preemption.reached(step)
            is_last = step == end_step
            # The first step is logged too: the first loss appears right after compiling.
            log_now = step % config.log_every_steps == 0 or is_last or step == start_step + 1
            save_now = step % config.checkpoint_every_steps == 0 or is_last or preempted
            if log_now or save_now:
                metrics = jax.device_get(metrics)
                _check_finite(metrics, step, last_saved, ckpt)
                if int(metrics["invalid_labels"]):
                    raise SourceError(
                        f"step {step}: {int(metrics['invalid_labels'])} labels outside "
                        f"[0, {source.num_classes}): the dataset's labels do not match its class count (check its "
                        "property file or rebuild the dataset)"
                    )
                if log_now:
                    reporter.log(step, metrics)
                if save_now:  # only ever a state whose loss is finite
                    last_saved = ckpt.save(state, data_position, setup.meta)
            every = config.eval.every_steps
            if embedder is not None and (is_last or (every and step % every == 0)):
                _evaluate(embedder, pair_sets, state, step, reporter, setup.meta["eval_encoder"])
            if preempted:
                ckpt.wait()
                reporter.message(
                    f"SIGTERM: saved checkpoint step {step} in {ckpt.directory}; run the same command again to resume"
                )
                break
            if not is_last:
                images, labels = _global_batch(mesh, *next(loader))
    finally:
        preemption.restore()
        ckpt.close()  # waits for pending saves: the last good checkpoint is complete
        reporter.close()
        loader.close()
    if step == end_step:
        reporter.message(f"done: step {step}, checkpoint in {ckpt.directory}")
    return state


def eval_weights(state: TrainState, encoder: str) -> tuple[dict, dict]:
    """``(params, batch_stats)`` of the encoder to evaluate: ``"online"`` or ``"ema"``."""
    if encoder == "ema":
        return state.ema["params"], state.ema["batch_stats"]
    return state.params, state.batch_stats


def _evaluate(embedder: Embedder, pair_sets, state: TrainState, step: int, reporter: Reporter, encoder: str) -> None:
    """Verification on every pair set with the current weights of ``encoder`` (all
    processes embed; the lead one reports). Its time is kept out of the next throughput
    figure."""
    embedder.set_weights(*eval_weights(state, encoder))
    results = evaluation.run_pair_sets(pair_sets, embedder)
    reporter.log_eval(step, {name: r.metrics() for name, r in results.items()})
    reporter.message(f"eval step {step}: {evaluation.summary_line(results)}")
    reporter.reset_clock(step)


def _check_finite(metrics, step: int, last_saved: int | None, ckpt) -> None:
    """Stops on a non-finite loss or gradient (which would make the new state non-finite)."""
    values = {name: float(metrics[name]) for name in ("loss", "grad_norm", "head_grad_norm")}
    if all(math.isfinite(v) for v in values.values()):
        return
    loss = ", ".join(f"{name} {v}" for name, v in values.items())
    ckpt.wait()
    kept = (
        f"checkpoint step {last_saved} in {ckpt.directory} is intact"
        if last_saved is not None
        else "no checkpoint was written"
    )
    raise TrainingDiverged(
        f"non-finite training at step {step} ({loss}); stopped without saving ({kept}). Lower the "
        "learning rate (--config.optimizer.lr), enable gradient clipping "
        "(--config.optimizer.clip_grad_norm=5) or a warmup (--config.schedule.warmup_epochs), "
        "or train in float32 (--config.dtype=float32)"
    )
