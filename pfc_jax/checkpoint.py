"""Checkpoints with Orbax: periodic async saves, keep-N, atomic, resume on any device count.

Each step directory under ``<workdir>/checkpoints`` holds four items:

* ``backbone``: params and BatchNorm statistics, all an inference tool needs
  (:func:`load_backbone` reads only this and ``meta``, never the centers);
* ``train``: step, backbone optimizer state, class centers and their optimizer state,
  the PRNG key;
* ``data``: the data iterator's position (JSON);
* ``meta``: the model's :class:`~pfc_jax.models.ModelSpec` (``meta["model"]``), class
  count, device count at save time (JSON).

Orbax writes each step to a temporary directory and renames it when complete, so an
interrupted save never looks like a checkpoint. Class centers are stored with the
padding of the device count that wrote them; restoring onto another device count pads
or truncates the rows (the padding rows are zero and never trained) and re-shards them.
That holds for every leaf of the head's state that is split by rows over the devices.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from pfc_jax import sharding
from pfc_jax.errors import InputError
from pfc_jax.models import ModelSpec
from pfc_jax.step import TrainState

BACKBONE, TRAIN, DATA, META = "backbone", "train", "data", "meta"


class CheckpointError(InputError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


class Backbone(NamedTuple):
    """What :func:`load_backbone` returns."""

    model: Any  # the NNX backbone, float32, to be called with train=False
    spec: ModelSpec
    step: int


def _split(state: TrainState):
    backbone = {"params": state.params, "batch_stats": state.batch_stats}
    train = {"step": state.step, "opt_state": state.opt_state, "head": state.head, "rng": state.rng}
    return backbone, train


def _restore_args(abstract):
    """Restore args per leaf: the target sharding; leaves split by rows over the devices
    (class centers, their optimizer rows) may be padded/truncated from the saved shape."""

    def args(leaf):
        by_rows = leaf.ndim > 0 and tuple(leaf.sharding.spec)[:1] == (sharding.DATA_AXIS,)
        return ocp.ArrayRestoreArgs(
            sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype, strict=not by_rows
        )

    return jax.tree.map(args, abstract)


class Checkpointer:
    """Saves and restores :class:`~pfc_jax.step.TrainState` plus data position and metadata."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: TrainState, data_state: dict, meta: dict) -> int:
        """Starts an (async) save at ``state.step``; returns that step."""
        step = int(jax.device_get(state.step))
        backbone, train = _split(state)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    BACKBONE: ocp.args.PyTreeSave(backbone),
                    TRAIN: ocp.args.PyTreeSave(train),
                    DATA: ocp.args.JsonSave(data_state),
                    META: ocp.args.JsonSave(meta),
                }
            ),
            force=True,
        )
        return step

    def read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

    def restore(self, step: int, abstract: TrainState) -> tuple[TrainState, dict, dict]:
        """(state, data_state, meta) at ``step``, laid out like ``abstract`` (shapes,
        dtypes, shardings of this run: any device count)."""
        backbone, train = _split(abstract)
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        BACKBONE: ocp.args.PyTreeRestore(backbone, restore_args=_restore_args(backbone)),
                        TRAIN: ocp.args.PyTreeRestore(train, restore_args=_restore_args(train)),
                        DATA: ocp.args.JsonRestore(),
                        META: ocp.args.JsonRestore(),
                    }
                ),
            )
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not fit this run's model "
                f"and optimizer ({e}). Resume with the config it was written with "
                f"({self.directory.parent / 'config.json'}), or use a new --workdir."
            ) from None
        b, t = out[BACKBONE], out[TRAIN]
        state = TrainState(
            step=t["step"],
            params=b["params"],
            batch_stats=b["batch_stats"],
            opt_state=t["opt_state"],
            head=t["head"],
            rng=t["rng"],
        )
        return state, out[DATA], out[META]

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def read_spec(meta: dict) -> ModelSpec:
    """The :class:`ModelSpec` saved in a checkpoint's ``meta`` (any layout since 0.1.0)."""
    try:
        return ModelSpec.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's metadata has no readable model description ({e})") from None


def load_backbone(
    workdir: str | pathlib.Path, step: int | None = None, *, log: Callable[[str], object] | None = None
) -> Backbone:
    """The trained backbone alone (no centers): ``(model, spec, step)``.

    The model is float32 whatever it was trained in; call it with ``train=False``.
    ``step`` defaults to the latest checkpoint. Raises :class:`CheckpointError` when the
    workdir has no (such) checkpoint or the checkpoint cannot be read. ``log`` gets
    ``"loading checkpoint step N of WORKDIR"`` before the (slow) read.
    """
    directory = pathlib.Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"{workdir} has no checkpoints/ directory (is it a pfc_jax training workdir?)")
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax notes that a read-only manager is read-only
    try:
        manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    finally:
        absl_logging.set_verbosity(verbosity)
    steps = list(manager.all_steps())
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {directory} (train first, or check the --workdir)")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise CheckpointError(
            f"no checkpoint for step {step} in {directory}; available: {sorted(steps)} (choose one of them)"
        )
    if log is not None:
        log(f"loading checkpoint step {step} of {workdir}")
    try:
        model, spec = _restore_backbone(manager, step)
    except (OSError, ValueError, KeyError) as e:  # a step folder with missing or damaged items
        raise CheckpointError(
            f"cannot read the backbone of checkpoint step {step} in {directory}: {type(e).__name__}: {e} "
            "(choose another --step, or delete the damaged step folder)"
        ) from None
    finally:
        manager.close()
    return Backbone(model, spec, step)


def _restore_backbone(manager, step: int):
    from flax import nnx

    meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    spec = read_spec(meta)
    graphdef, params, stats = nnx.split(spec.create(dtype="float32"), nnx.Param, nnx.BatchStat)
    target = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), target)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{
                BACKBONE: ocp.args.PyTreeRestore(
                    abstract,
                    restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract),
                )
            }
        ),
    )[BACKBONE]
    return nnx.merge(graphdef, restored["params"], restored["batch_stats"]), spec
