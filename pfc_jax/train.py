"""The training loop: ``train_and_evaluate(config, workdir)``.

Reads top to bottom: mesh and config checks, input, model and head, restore or
initialize, compile, loop (step, log, checkpoint), finish.
"""

from __future__ import annotations

import dataclasses
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


class TrainingDiverged(RunError):
    """The loss became NaN/Inf; the message names the step, the last good checkpoint and fixes."""


def make_data(config, source):
    """This process's batches of ``source`` per ``config.data`` (see pfc_jax.data.pipeline)."""
    d = config.data
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
        sampler=d.sampler,
        images_per_identity=d.images_per_identity_in_batch,
    )


def run_length(config, num_examples: int) -> tuple[int, int]:
    """(total_steps, warmup_steps) from the config and the dataset size."""
    steps_per_epoch = num_examples / config.global_batch_size
    total = config.total_steps or int(math.ceil(config.num_epochs * steps_per_epoch))
    warmup = int(round(config.schedule.warmup_epochs * steps_per_epoch))
    return total, warmup


@dataclasses.dataclass
class Setup:
    """Everything built from a config before the state exists."""

    trainer: TrainStep
    spec: ModelSpec
    params: dict  # initial backbone parameters
    batch_stats: dict
    num_params: int
    total_steps: int
    warmup_steps: int
    meta: dict  # written with every checkpoint


def build(config, mesh, *, num_classes: int, num_examples: int) -> Setup:
    """Model, head, optimizers and the step for ``config`` on ``mesh``."""
    total_steps, warmup_steps = run_length(config, num_examples)
    validate_run_length(config, total_steps=total_steps, warmup_steps=warmup_steps)
    spec = ModelSpec.from_config(config)
    model = spec.create(config.seed)
    lr = optim.schedule(config, total_steps=total_steps, warmup_steps=warmup_steps)
    head = heads.HEADS[config.head.name].build(config, mesh, num_classes=num_classes, learning_rate=lr)
    trainer, params, batch_stats = TrainStep.for_model(
        model,
        head,
        optim.backbone_optimizer(config, lr),
        lr,
        grad_accum_steps=config.grad_accum_steps,
        dtype=spec.compute_dtype,
    )
    meta = {
        "model": spec.to_dict(),
        "head": config.head.name,
        "num_classes": num_classes,
        "num_devices": mesh.size,
        "global_batch_size": config.global_batch_size,
        "total_steps": total_steps,
    }
    return Setup(trainer, spec, params, batch_stats, models.count_params(model), total_steps, warmup_steps, meta)


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


def _global_batch(mesh, images: np.ndarray, labels: np.ndarray):
    batch = sharding.batch_sharding(mesh)
    return (
        jax.make_array_from_process_local_data(batch, images),
        jax.make_array_from_process_local_data(batch, labels),
    )


def _check_restored(meta: dict, setup: Setup, step: int, directory) -> None:
    where = f"checkpoint step {step} in {directory}"
    if meta["num_classes"] != setup.meta["num_classes"]:
        raise checkpoint.CheckpointError(
            f"{where} has num_classes={meta['num_classes']}, this run's dataset has "
            f"{setup.meta['num_classes']} (use the same dataset or a new --workdir)"
        )
    saved = checkpoint.read_spec(meta)
    if not saved.same_network(setup.spec):
        raise checkpoint.CheckpointError(
            f"{where} was written by model {saved}, this config builds {setup.spec} "
            "(use the same model or a new --workdir)"
        )
    head = meta.get("head", "partial_fc")  # checkpoints of 0.1.0 name no head: Partial FC
    if head != setup.meta["head"]:
        raise checkpoint.CheckpointError(
            f"{where} was written by head {head!r}, this config uses {setup.meta['head']!r} "
            "(use the same head or a new --workdir)"
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains per ``config``, resuming from ``workdir`` if it holds a checkpoint."""
    # ---- Mesh and config ---------------------------------------------------------------
    mesh = sharding.make_mesh()
    validate(config, num_devices=mesh.size)
    workdir = pathlib.Path(workdir).absolute()
    lead = jax.process_index() == 0
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
        print(f"config:\n{config}", flush=True)

    # ---- Input -----------------------------------------------------------------------------
    source = make_source(config.data)
    loader = make_data(config, source)

    # ---- Model, head, optimizers -------------------------------------------------------
    setup = build(config, mesh, num_classes=source.num_classes, num_examples=len(source))
    trainer = setup.trainer
    end_step = config.stop_at_step or setup.total_steps

    # ---- Restore or initialize ---------------------------------------------------------
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        _check_restored(ckpt.read_meta(latest), setup, latest, ckpt.directory)
        state, data_state, _ = ckpt.restore(latest, trainer.abstract_state)
        loader.restore(data_state)
        what = f"resumed from checkpoint step {latest}"
    else:
        state = trainer.init(setup.params, setup.batch_stats, jax.random.key(config.seed))
        what = "initialized a new run"
    start_step = int(jax.device_get(state.step))

    reporter = Reporter(
        workdir,
        total_steps=setup.total_steps,
        start_step=start_step,
        global_batch=config.global_batch_size,
        enabled=lead,
        tensorboard=config.tensorboard,
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
        return state

    # ---- Evaluators (pair files loaded now: a bad one stops before training) ----------------
    pair_sets = evaluation.make_pair_sets(config)
    embedder = None
    if pair_sets:
        model = nnx.merge(trainer.graphdef, setup.params, setup.batch_stats)
        embedder = Embedder(model, batch_size=config.eval.batch_size, mesh=mesh)

    # ---- Compile (once, ahead of time) -------------------------------------------------
    images, labels = _global_batch(mesh, *next(loader))
    compiled = trainer.jit().lower(state, images, labels).compile()
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
            log_now = step % config.log_every_steps == 0 or is_last
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
                _evaluate(embedder, pair_sets, state, step, reporter)
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


def _evaluate(embedder: Embedder, pair_sets, state: TrainState, step: int, reporter: Reporter) -> None:
    """Verification on every pair set with the current weights (all processes embed; the
    lead one reports). Its time is kept out of the next throughput figure."""
    embedder.set_weights(state.params, state.batch_stats)
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
