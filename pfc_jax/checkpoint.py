"""Checkpoints with Orbax: periodic async saves, keep-N, atomic, resume on any device count.

Each step directory under ``<workdir>/checkpoints`` holds four or five items:

* ``backbone``: params and BatchNorm statistics, all an inference tool needs
  (:func:`load_backbone` reads only this and ``meta``, never the centers);
* ``ema``: the same for the backbone's moving average, in runs that keep one (DCQ's key
  encoder); :func:`load_backbone` reads it instead when asked for the EMA encoder;
* ``train``: step, backbone optimizer state, class centers and their optimizer state,
  the PRNG key;
* ``data``: the data iterator's position (JSON);
* ``meta``: the model's :class:`~pfc_jax.models.ModelSpec` (``meta["model"]``), class
  count, device count at save time (JSON).

An *imported* checkpoint (``meta["imported"]``, written by :mod:`pfc_jax.convert`) holds
only ``backbone``, ``meta`` and optionally ``centers`` (f32[C, D], class order, no
padding): inference tools read it as any other; the trainer starts a run from it
(:func:`read_initial`) instead of resuming it.

Orbax writes each step to a temporary directory and renames it when complete, so an
interrupted save never looks like a checkpoint. Class centers are stored with the
padding of the device count that wrote them; restoring onto another device count pads
or truncates the rows (the padding rows are zero and never trained) and re-shards them.
That holds for every leaf of the head's state that is split by rows over the devices.
Those leaves may also change storage between float32 and bfloat16 (kept as uint16 bits;
``config.head.storage_dtype``, :mod:`pfc_jax.heads.storage`): they are read as saved and
converted.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from pfc_jax import sharding
from pfc_jax.errors import InputError
from pfc_jax.heads import storage
from pfc_jax.models import ModelSpec
from pfc_jax.step import TrainState

BACKBONE, EMA, TRAIN, DATA, META = "backbone", "ema", "train", "data", "meta"
CENTERS = "centers"  # imported checkpoints only: f32[C, D] class centers in class order
ENCODERS = ("online", "ema")  # which backbone an inference tool reads


class CheckpointError(InputError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


class Backbone(NamedTuple):
    """What :func:`load_backbone` returns."""

    model: Any  # the NNX backbone, float32, to be called with train=False
    spec: ModelSpec
    step: int
    encoder: str  # "online" (the trained backbone) or "ema" (its moving average)


def _split(state: TrainState) -> dict:
    """The state as Orbax items (``ema`` only where the run keeps one)."""
    items = {
        BACKBONE: {"params": state.params, "batch_stats": state.batch_stats},
        TRAIN: {"step": state.step, "opt_state": state.opt_state, "head": state.head, "rng": state.rng},
    }
    if state.ema is not None:
        items[EMA] = state.ema
    return items


def _restore_args(abstract):
    """Restore args per leaf: the target sharding; leaves split by rows over the devices
    (class centers, their optimizer rows) may be padded/truncated from the saved shape."""

    def args(leaf):
        by_rows = leaf.ndim > 0 and tuple(leaf.sharding.spec)[:1] == (sharding.DATA_AXIS,)
        return ocp.ArrayRestoreArgs(
            sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype, strict=not by_rows
        )

    return jax.tree.map(args, abstract)


def _leaves(tree) -> list[tuple[str, jax.ShapeDtypeStruct]]:
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def state_signature(state: TrainState) -> list[list]:
    """``[path, shape, dtype]`` of every leaf of ``state`` (arrays or their abstract
    versions), the leading size of row-split leaves left out (it follows the device count).
    Saved in ``meta["state"]`` so that a resume can tell a checkpoint that differs from
    this run's state (and where) from one that is damaged."""
    out = []
    for item, tree in _split(state).items():
        for path, leaf in _leaves(tree):
            shape = list(leaf.shape)
            spec = getattr(getattr(leaf, "sharding", None), "spec", None)
            if shape and spec is not None and tuple(spec)[:1] == (sharding.DATA_AXIS,):
                shape[0] = None
            out.append([f"{item}{path}", shape, str(leaf.dtype)])
    return out


def _hint(path: str) -> str:
    if path.startswith(f"{TRAIN}['opt_state']"):
        return "the backbone's optimizer (config.optimizer.*)"
    if path.startswith(f"{TRAIN}['head']"):
        return "the head (config.head.*)"
    if path.startswith(EMA):
        return "whether the run keeps an EMA of the backbone (config.ema.enabled, config.head.name)"
    return "the model (config.model.*)"


def _cause_first(paths) -> list[str]:
    """``paths`` in a fixed order: the backbone's optimizer, the model, the EMA, then the
    head (a changed optimizer changes the head's optimizer rows too: the cause is named),
    each in signature order; never the order of a set, which changes from run to run."""
    rank = lambda path: (
        0 if path.startswith(f"{TRAIN}['opt_state']") else 2 if path.startswith(f"{TRAIN}['head']") else 1
    )
    return sorted(paths, key=rank)


def _converts(path: str, saved: tuple, here: tuple) -> bool:
    """Whether a saved leaf ``(shape, dtype)`` is this run's ``here`` in another storage: a
    row-split head leaf (leading size None) stored as float32 in one, bfloat16 in the other."""
    (saved_shape, saved_dtype), (shape, dtype) = saved, here
    stored = {str(d) for d in storage.STORED.values()}
    return (
        path.startswith(f"{TRAIN}['head']")
        and list(saved_shape) == list(shape)
        and bool(shape)
        and shape[0] is None
        and saved_dtype != dtype
        and {saved_dtype, dtype} <= stored
    )


def _first_difference(saved: list, here: list) -> str | None:
    """Where two state signatures first differ, in words; None when equal."""
    saved_by, here_by = {p: (s, d) for p, s, d in saved}, {p: (s, d) for p, s, d in here}
    for path in _cause_first(p for p, _, _ in here if p not in saved_by)[:1]:
        return f"{path} is in this run's state but not in the checkpoint ({_hint(path)} differs)"
    for path in _cause_first(p for p, _, _ in saved if p not in here_by)[:1]:
        return f"{path} is in the checkpoint but not in this run's state ({_hint(path)} differs)"
    for path, (shape, dtype) in here_by.items():
        saved_leaf, leaf = (list(saved_by[path][0]), saved_by[path][1]), (list(shape), dtype)
        if saved_leaf != leaf and not _converts(path, saved_leaf, leaf):
            return (
                f"{path} is {saved_by[path][1]}{saved_by[path][0]} in the checkpoint, {dtype}{shape} here "
                f"({_hint(path)} differs)"
            )
    return None


def _in_storage(restored: jax.Array, target: jax.ShapeDtypeStruct) -> jax.Array:
    """A restored head leaf in this run's storage (converted on its own devices)."""
    if restored.dtype == target.dtype:
        return restored
    convert = jax.jit(lambda a: storage.convert(a, target.dtype), out_shardings=target.sharding, donate_argnums=0)
    return convert(restored)


class DamagedCheckpoint(CheckpointError):
    """A checkpoint step that cannot be read although it fits this run (files missing or corrupt)."""


class Checkpointer:
    """Saves and restores :class:`~pfc_jax.step.TrainState` plus data position and metadata.

    ``on_saved(step)`` is called (from a background thread when saving asynchronously)
    once a save is committed to disk. A ``read_only`` one never writes (moving a damaged
    step aside is its one change to the folder).
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        keep: int = 3,
        async_save: bool = True,
        on_saved: Callable[[int], None] | None = None,
        read_only: bool = False,
    ):
        self.directory = pathlib.Path(directory).absolute()
        self._read_only = read_only
        self._on_saved = on_saved
        self._saving: int | None = None
        self._keep, self._async = keep, async_save
        self._manager = self._open()

    def _open(self):
        async_options = None
        if self._on_saved is not None and self._async:
            async_options = ocp.AsyncOptions(post_finalization_callback=self._committed)
        verbosity = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax notes that a read-only manager is read-only
        try:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self._keep,
                enable_async_checkpointing=self._async,
                create=not self._read_only,
                read_only=self._read_only,
                async_options=async_options,
            )
            return ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl_logging.set_verbosity(verbosity)

    def _committed(self) -> None:
        step, self._saving = self._saving, None
        if step is not None and self._on_saved is not None:
            self._on_saved(step)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: TrainState, data_state: dict, meta: dict) -> int:
        """Starts an (async) save at ``state.step``; returns that step. ``meta`` gets the
        state's signature (:func:`state_signature`) added."""
        step = int(jax.device_get(state.step))
        self._manager.wait_until_finished()  # one save in flight: on_saved names the right step
        self._saving = step
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{name: ocp.args.PyTreeSave(tree) for name, tree in _split(state).items()},
                **{
                    DATA: ocp.args.JsonSave(data_state),
                    META: ocp.args.JsonSave({**meta, "state": state_signature(state)}),
                },
            ),
            force=True,
        )
        if not self._async:
            self._committed()
        return step

    def read_meta(self, step: int) -> dict:
        """The ``meta`` item of ``step``; :class:`DamagedCheckpoint` when it cannot be read."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for missing/corrupt files
            raise DamagedCheckpoint(f"checkpoint step {step}: its metadata cannot be read ({_brief(e)})") from None

    def restore(self, step: int, abstract: TrainState, meta: dict | None = None) -> tuple[TrainState, dict, dict]:
        """(state, data_state, meta) at ``step``, laid out like ``abstract`` (shapes,
        dtypes, shardings of this run: any device count).

        Raises :class:`CheckpointError` naming the first leaf where the checkpoint's state
        differs from this run's, and :class:`DamagedCheckpoint` when it fits but cannot be
        read. (Checkpoints of 0.1.0 carry no signature: a failure there is reported as
        either, without a verdict.) ``meta``: the step's metadata, when already read.
        """
        meta = self.read_meta(step) if meta is None else meta
        where = f"checkpoint step {step} in {self.directory}"
        saved = meta.get("state")
        if saved is not None:
            difference = _first_difference(saved, state_signature(abstract))
            if difference:
                raise CheckpointError(
                    f"{where} does not fit this run: {difference} (resume with the config it was written with, "
                    f"{self.directory.parent / 'config.json'}, or use a new --workdir)"
                )
        # Head leaves in another storage (float32 / bfloat16 bits) are read as saved.
        saved_dtypes = {path: dtype for path, _, dtype in saved or ()}

        def as_saved(item, tree):
            def leaf(path, x):
                dtype = saved_dtypes.get(f"{item}{jax.tree_util.keystr(path)}", str(x.dtype))
                return (
                    x if dtype == str(x.dtype) else jax.ShapeDtypeStruct(x.shape, np.dtype(dtype), sharding=x.sharding)
                )

            return jax.tree_util.tree_map_with_path(leaf, tree)

        items = {name: as_saved(name, tree) for name, tree in _split(abstract).items()}
        _silence_failed_reads()
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        name: ocp.args.PyTreeRestore(tree, restore_args=_restore_args(tree))
                        for name, tree in items.items()
                    },
                    **{
                        DATA: ocp.args.JsonRestore(),
                        META: ocp.args.JsonRestore(),
                    },
                ),
            )
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for missing/corrupt files
            if saved is not None:
                raise DamagedCheckpoint(f"{where} cannot be read: {_brief(e)}") from None
            raise CheckpointError(
                f"{where} cannot be restored ({_brief(e)}): it is damaged, or was written with another model or "
                f"optimizer (resume with the config it was written with, {self.directory.parent / 'config.json'}, "
                "or use a new --workdir)"
            ) from None
        b, t = out[BACKBONE], out[TRAIN]
        state = TrainState(
            step=t["step"],
            params=b["params"],
            batch_stats=b["batch_stats"],
            opt_state=t["opt_state"],
            head=jax.tree.map(_in_storage, t["head"], abstract.head),
            rng=t["rng"],
            ema=out[EMA] if EMA in items else None,
        )
        return state, out[DATA], out[META]

    def restore_backbone(self, step: int, encoder: str | None = None):
        """``(model, spec, encoder)``: the backbone item of ``step`` alone (numpy arrays,
        float32), in the network its :class:`ModelSpec` describes; never reads the head.
        ``encoder``: ``"online"`` (the trained backbone) or ``"ema"`` (its moving average);
        None: the one the run evaluates (``meta["eval_encoder"]``, online before 0.3)."""
        from flax import nnx

        meta = self.read_meta(step)
        spec = read_spec(meta)
        encoder = encoder or meta.get("eval_encoder", "online")
        if encoder not in ENCODERS:
            raise CheckpointError(f"unknown encoder {encoder!r} (choose one of {', '.join(ENCODERS)})")
        if encoder == "ema" and not meta.get("ema", False):
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} has no EMA encoder (the run kept none: "
                "config.ema.enabled); use the online encoder (--encoder online)"
            )
        abstract_model = nnx.eval_shape(lambda: spec.create(dtype="float32"))  # shapes only
        graphdef, params, stats = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
        target = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}
        item = EMA if encoder == "ema" else BACKBONE
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
        _silence_failed_reads()
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(**{item: ocp.args.PyTreeRestore(abstract, restore_args=as_numpy)}),
            )[item]
        except Exception as e:  # noqa: BLE001 - a step folder with missing or damaged items
            what = "EMA backbone" if encoder == "ema" else "backbone"
            raise CheckpointError(
                f"cannot read the {what} of checkpoint step {step} in {self.directory}: {_brief(e)} "
                "(choose another --step, or delete the damaged step folder)"
            ) from None
        return nnx.merge(graphdef, restored["params"], restored["batch_stats"]), spec, encoder

    def restore_latest(self, abstract: TrainState, check: Callable[[dict, int], None] = lambda meta, step: None):
        """The newest step that restores: ``(step, state, data_state, meta)``, or None
        when there is no checkpoint.

        ``check(meta, step)`` vets each step's metadata first (and raises to refuse the
        resume). A damaged step is moved aside to ``<step>.damaged`` (never deleted), with a
        warning, and the next older one is tried; when none restores, a
        :class:`DamagedCheckpoint` says so.
        """
        moved = []
        while (step := self.latest_step()) is not None:
            try:
                meta = self.read_meta(step)
                check(meta, step)
                state, data_state, meta = self.restore(step, abstract, meta)
                return step, state, data_state, meta
            except DamagedCheckpoint as e:
                moved.append(self._move_aside(step, e))
        if moved:
            raise DamagedCheckpoint(
                f"no checkpoint in {self.directory} can be read; moved aside: {', '.join(moved)} "
                "(inspect or delete them; to start afresh use a new --workdir)"
            )
        return None

    def _move_aside(self, step: int, error: Exception) -> str:
        """Renames a damaged step folder to ``<step>.damaged[.N]`` and reopens the manager."""
        from jax.experimental import multihost_utils

        source = self.directory / str(step)
        target = self.directory / f"{step}.damaged"
        n = 1
        while target.exists():
            target, n = self.directory / f"{step}.damaged.{n}", n + 1
        if jax.process_index() == 0:
            os.rename(source, target)
            print(f"warning: {error}; moved it to {target} and trying the previous checkpoint", flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"pfc_jax: moved checkpoint {step} aside")
        self._manager.close()
        self._manager = self._open()
        return target.name

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _silence_failed_reads() -> None:
    """When a restore fails on damaged files, Orbax closes its event loop while TensorStore
    reads are still in flight; their errors then surface as asyncio's "exception was never
    retrieved" log records and as reports from callbacks into the closed loop, possibly
    before the failed restore even returns. The failure is reported once, as it should be;
    these echoes are silenced for the process, from before the first restore on."""
    global _silenced
    if _silenced:
        return
    _silenced = True
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    closed_loop = lambda error: isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    unraisable, excepthook = sys.unraisablehook, sys.excepthook
    # TensorStore's callbacks report through either hook, depending on the thread.
    sys.unraisablehook = lambda u: None if closed_loop(u.exc_value) else unraisable(u)
    sys.excepthook = lambda kind, error, tb: None if closed_loop(error) else excepthook(kind, error, tb)


_silenced = False


def _brief(error: Exception) -> str:
    """The first line of an exception, shortened: Orbax/TensorStore messages run to pages."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:300]}"


def is_imported(meta: dict) -> bool:
    """True for a checkpoint written by :mod:`pfc_jax.convert` (a starting point, not a
    train state)."""
    return bool(meta.get("imported"))


class Initial(NamedTuple):
    """What :func:`read_initial` returns: a run's starting weights."""

    params: dict
    batch_stats: dict
    spec: ModelSpec
    centers: np.ndarray | None  # f32[C, D] in class order, or None
    source: str  # "<workdir> step N"


def read_initial(workdir: str | pathlib.Path, *, centers: bool) -> Initial:
    """The backbone (parameters and BatchNorm statistics, numpy) of ``workdir``'s latest
    checkpoint, and with ``centers`` its class centers, which only imported checkpoints
    hold as such (:class:`CheckpointError` otherwise)."""
    from flax import nnx

    model, spec, step, _ = load_backbone(workdir, encoder="online")
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    source = f"{workdir} step {step}"
    loaded = None
    if centers:
        ckpt = Checkpointer(pathlib.Path(workdir).absolute() / "checkpoints", read_only=True)
        try:
            meta = ckpt.read_meta(step)
            if not is_imported(meta) or not meta.get("num_classes"):
                raise CheckpointError(
                    f"{source} holds no importable class centers (only workdirs written by "
                    "`python -m pfc_jax.convert ... --centers` do; to go on with a pfc_jax run, resume it in its "
                    "own workdir, or set config.init_from_centers=False for a fresh head)"
                )
            shape = (int(meta["num_classes"]), spec.embedding_dim)
            abstract = {"centers": jax.ShapeDtypeStruct(shape, np.float32)}
            as_numpy = {"centers": ocp.RestoreArgs(restore_type=np.ndarray)}
            _silence_failed_reads()
            try:
                loaded = ckpt._manager.restore(
                    step,
                    args=ocp.args.Composite(**{CENTERS: ocp.args.PyTreeRestore(abstract, restore_args=as_numpy)}),
                )[CENTERS]["centers"]
            except Exception as e:  # noqa: BLE001 - missing or damaged files
                raise CheckpointError(f"cannot read the class centers of {source}: {_brief(e)}") from None
        finally:
            ckpt.close()
    return Initial(nnx.to_pure_dict(params), nnx.to_pure_dict(stats), spec, loaded, source)


def read_spec(meta: dict) -> ModelSpec:
    """The :class:`ModelSpec` saved in a checkpoint's ``meta`` (any layout since 0.1.0)."""
    try:
        return ModelSpec.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's metadata has no readable model description ({e})") from None


def load_backbone(
    workdir: str | pathlib.Path,
    step: int | None = None,
    *,
    encoder: str | None = None,
    log: Callable[[str], object] | None = None,
) -> Backbone:
    """The trained backbone alone (no centers): ``(model, spec, step, encoder)``.

    The model is float32 whatever it was trained in; call it with ``train=False``.
    ``step`` defaults to the latest checkpoint. ``encoder``: ``"online"`` or ``"ema"``
    (the moving average, where the run kept one); None: the run's ``eval.encoder``
    (DCQ: ema). Raises :class:`CheckpointError` when the workdir has no (such) checkpoint
    or the checkpoint cannot be read. ``log`` gets ``"loading checkpoint step N of
    WORKDIR"`` before the (slow) read.
    """
    directory = pathlib.Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"{workdir} has no checkpoints/ directory (is it a pfc_jax training workdir?)")
    ckpt = Checkpointer(directory, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {directory} (train first, or check the --workdir)")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {directory}; available: {sorted(steps)} (choose one of them)"
            )
        if log is not None:
            which = "" if encoder in (None, "online") else f" ({encoder} encoder)"
            log(f"loading checkpoint step {step}{which} of {workdir}")
        model, spec, encoder = ckpt.restore_backbone(step, encoder)
    finally:
        ckpt.close()
    return Backbone(model, spec, step, encoder)
