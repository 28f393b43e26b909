"""Import an insightface arcface_torch model: its backbone and its sharded class centers.

    python -m pfc_jax.convert from-arcface-torch --backbone model.pt --model iresnet50 --workdir /runs/r50_imported
    python -m pfc_jax.convert from-arcface-torch --backbone model.pt --model iresnet50 \\
        --centers /arcface_run/ --num-classes 93431 --workdir /runs/r50_continued

The workdir gets a pfc_jax checkpoint at step 0: the backbone (parameters and BatchNorm
statistics) and, with ``--centers``, the class centers in class order; its metadata holds
the model's :class:`~pfc_jax.models.ModelSpec`. ``evaluate``, ``export`` and ``embed``
read it as any run's; ``main`` on it trains from it (backbone and centers loaded, the
optimizer state fresh) on any number of devices; ``config.init_from`` starts another run
from it.

``--backbone``: a ``torch.save`` of a backbone's ``state_dict()`` (arcface_torch's
``backbone.pth`` / ``model.pt``) or a ``checkpoint_gpu_<rank>.pt`` (its
``state_dict_backbone``). Keys prefixed ``module.`` (a DistributedDataParallel save) are
accepted. ``--centers``: the folder of one run's per-GPU files, in this order of preference:
``softmax_fc_gpu_<rank>.pt`` (``{"weight": [num_local, D]}``, arcface_torch 2022),
``checkpoint_gpu_<rank>.pt`` (``state_dict_softmax_fc``, ``save_all_states``) or
``rank_<rank>_softmax_weight.pt`` (a bare tensor, 2021). Rank ``r`` of ``W`` holds the
classes ``[class_start(r), class_start(r) + num_local(r))`` with ``num_local(r) = C // W +
(r < C % W)``: arcface_torch's rule, the first ``C mod W`` ranks holding one class more.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np

from pfc_jax.convert import names, torch_file
from pfc_jax.errors import InputError

CENTER_FILES = (  # (pattern, what it holds), in order of preference
    (re.compile(r"softmax_fc_gpu_(\d+)\.pt"), "softmax_fc_gpu_<rank>.pt"),
    (re.compile(r"checkpoint_gpu_(\d+)\.pt"), "checkpoint_gpu_<rank>.pt"),
    (re.compile(r"rank_(\d+)_softmax_weight\.pt"), "rank_<rank>_softmax_weight.pt"),
)


def num_local(num_classes: int, world: int, rank: int) -> int:
    """Classes of rank ``rank`` of ``world`` in arcface_torch's Partial FC."""
    return num_classes // world + int(rank < num_classes % world)


def class_start(num_classes: int, world: int, rank: int) -> int:
    """First class of rank ``rank`` of ``world`` in arcface_torch's Partial FC."""
    return (num_classes // world) * rank + min(rank, num_classes % world)


def backbone_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The backbone's state dict in ``path`` (a state dict or a ``checkpoint_gpu`` file),
    float arrays as float32, without a ``module.`` prefix."""
    obj = torch_file.load(path)
    if isinstance(obj, dict) and "state_dict_backbone" in obj:
        obj = obj["state_dict_backbone"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise InputError(
            f"{path} does not hold a backbone's state dict (a dict of tensors, as torch.save(model.state_dict()) "
            "writes it, or arcface_torch's checkpoint_gpu_<rank>.pt)"
        )
    keys = [str(k) for k in obj]
    strip = all(k.startswith("module.") for k in keys)
    return {(k[len("module.") :] if strip else k): _widen(v) for k, v in zip(keys, obj.values())}


def _widen(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a


@dataclasses.dataclass(frozen=True)
class Centers:
    centers: np.ndarray  # float32 [C, D], class order
    files: list[str]
    kind: str  # which file pattern they came from

    @property
    def world(self) -> int:
        return len(self.files)


def read_centers(directory: str | pathlib.Path, num_classes: int | None = None) -> Centers:
    """The class centers of an arcface_torch run, reassembled in class order from its
    per-rank files in ``directory``; ``num_classes`` (when given) is checked against them."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise InputError(f"--centers {directory}: not a folder (give the folder of the softmax_fc_gpu_<rank>.pt files)")
    found = None
    for pattern, kind in CENTER_FILES:
        ranks = {int(m.group(1)): p for p in directory.iterdir() if (m := pattern.fullmatch(p.name))}
        if ranks:
            found = ranks, kind
            break
    if found is None:
        kinds = ", ".join(k for _, k in CENTER_FILES)
        raise InputError(f"--centers {directory}: none of {kinds} there")
    ranks, kind = found
    world = len(ranks)
    if sorted(ranks) != list(range(world)):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise InputError(f"--centers {directory}: {kind} files for ranks {sorted(ranks)}: rank(s) {missing} missing")
    shards = [_center_shard(ranks[r]) for r in range(world)]
    dims = {s.shape[1] for s in shards}
    if len(dims) != 1:
        raise InputError(f"--centers {directory}: the rank files differ in embedding size ({sorted(dims)})")
    total = sum(s.shape[0] for s in shards)
    if num_classes is None:
        num_classes = total
    elif num_classes != total:
        raise InputError(
            f"--num-classes {num_classes}, but the {world} rank files of {directory} hold {total} centers "
            "(give the run's class count, or all of its rank files)"
        )
    for r, s in enumerate(shards):
        if s.shape[0] != num_local(num_classes, world, r):
            raise InputError(
                f"{ranks[r]} holds {s.shape[0]} centers; with {num_classes} classes on {world} ranks, rank {r} "
                f"holds {num_local(num_classes, world, r)} (files of different runs or epochs mixed?)"
            )
    centers = np.concatenate(shards, axis=0)
    if not np.all(np.isfinite(centers)):
        raise InputError(f"--centers {directory}: the centers hold NaN or infinite values")
    return Centers(centers, [str(ranks[r]) for r in range(world)], kind)


def _center_shard(path: pathlib.Path) -> np.ndarray:
    obj = torch_file.load(path)
    if isinstance(obj, dict) and "state_dict_softmax_fc" in obj:
        obj = obj["state_dict_softmax_fc"]
    if isinstance(obj, dict):
        obj = obj.get("weight")
    if not isinstance(obj, np.ndarray) or obj.ndim != 2:
        raise InputError(
            f"{path} holds no [num_local, embedding_dim] weight (expected a Partial FC state dict with "
            "'weight', a checkpoint_gpu file or a bare tensor)"
        )
    return _widen(obj)


@dataclasses.dataclass(frozen=True)
class Converted:
    workdir: pathlib.Path
    spec: object  # ModelSpec
    num_params: int
    centers: Centers | None

    def summary(self) -> str:
        spec = self.spec
        lines = [f"converted {spec.name} ({self.num_params:,} parameters, {spec.embedding_dim}-d) to {self.workdir}"]
        if self.centers is not None:
            c = self.centers
            lines.append(
                f"  class centers: {c.centers.shape[0]:,} x {c.centers.shape[1]} from {c.world} {c.kind} files "
                "(class order restored; re-sharded over the devices of the run that loads them)"
            )
        lines.append(
            "  use it: python -m pfc_jax.export --workdir DIR --output model.onnx; python -m pfc_jax.evaluate "
            "--workdir DIR ...; python -m pfc_jax.main --config ... --workdir DIR (continues training)"
        )
        return "\n".join(lines)


def convert(
    backbone: str | pathlib.Path,
    model: str,
    workdir: str | pathlib.Path,
    *,
    centers: str | pathlib.Path | None = None,
    num_classes: int | None = None,
    embedding_dim: int | None = None,
    image_size: int = 112,
) -> Converted:
    """Writes ``workdir`` (see the module docstring). Everything is checked and written to
    a temporary folder first; on any error nothing is left behind."""
    import jax
    from flax import nnx

    from pfc_jax import models

    workdir = pathlib.Path(workdir).absolute()
    if model not in models.BACKBONES:
        raise InputError(f"--model {model!r}: unknown backbone (choose one of {', '.join(sorted(models.BACKBONES))})")
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise InputError(f"--workdir {workdir} exists and is not empty (give a new folder)")
    state_dict = backbone_state_dict(backbone)
    imported = read_centers(centers, num_classes) if centers is not None else None
    if embedding_dim is None:
        embedding_dim = imported.centers.shape[1] if imported is not None else 512
    elif imported is not None and imported.centers.shape[1] != embedding_dim:
        raise InputError(
            f"--embedding-dim {embedding_dim}, but the centers are {imported.centers.shape[1]}-d (they must agree)"
        )
    spec = models.ModelSpec(model, embedding_dim, image_size)
    net = nnx.eval_shape(lambda: spec.create(dtype="float32"))
    try:
        weights = names.assign(net, state_dict)
    except names.MappingError as e:
        raise InputError(f"{backbone} does not fit {model} ({embedding_dim}-d): {e}") from None
    _, params, stats = nnx.split(net, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    items = {"params": _fill(params, weights), "batch_stats": _fill(stats, weights)}
    meta = {
        "model": spec.to_dict(),
        "num_classes": None if imported is None else int(imported.centers.shape[0]),
        "num_devices": 1,
        "ema": False,
        "eval_encoder": "online",
        "imported": {
            "from": "arcface_torch",
            "backbone": str(pathlib.Path(backbone).absolute()),
            "centers": None if imported is None else imported.files,
        },
    }
    _write(workdir, items, None if imported is None else imported.centers, meta)
    num_params = sum(int(np.size(a)) for a in jax.tree.leaves(items["params"]))
    return Converted(workdir, spec, num_params, imported)


def _fill(structure: dict, values: dict) -> dict:
    """``structure`` (a pure dict) with every leaf taken from ``values`` at the same path."""
    out = {}
    for k, v in structure.items():
        out[k] = _fill(v, values[k]) if isinstance(v, dict) else np.asarray(values[k], np.float32)
    return out


def _write(workdir: pathlib.Path, backbone: dict, centers: np.ndarray | None, meta: dict) -> None:
    import orbax.checkpoint as ocp

    from pfc_jax import checkpoint

    workdir.parent.mkdir(parents=True, exist_ok=True)
    staged = pathlib.Path(tempfile.mkdtemp(prefix=f".{workdir.name}.", suffix=".tmp", dir=workdir.parent))
    try:
        manager = ocp.CheckpointManager(
            staged / "checkpoints", options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
        )
        args = {checkpoint.BACKBONE: ocp.args.PyTreeSave(backbone), checkpoint.META: ocp.args.JsonSave(meta)}
        if centers is not None:
            args[checkpoint.CENTERS] = ocp.args.PyTreeSave({"centers": centers})
        manager.save(0, args=ocp.args.Composite(**args))
        manager.wait_until_finished()
        manager.close()
        if workdir.exists():
            workdir.rmdir()  # checked empty above
        os.replace(staged, workdir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
