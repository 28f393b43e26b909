"""Checks a run's config before anything is built or compiled.

Every error names the field, the bad value and how to fix it, as a :class:`ConfigError`.
"""

from __future__ import annotations

import os

import ml_collections

from pfc_jax import models
from pfc_jax.evaluation import SYNTHETIC, bin_names, resolve_bin
from pfc_jax.heads.margins import CombinedMargin

DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("polynomial", "cosine", "constant")
SOURCES = ("synthetic", "recordio", "tfds", "folder")
SAMPLERS = ("uniform", "identity_balanced")
HEADS = ("partial_fc",)


class ConfigError(ValueError):
    """An invalid configuration; the message says which field and how to fix it."""


def _fail(field: str, value, fix: str):
    raise ConfigError(f"config.{field} = {value!r}: {fix} (set --config.{field}=...)")


def _check(cond: bool, field: str, value, fix: str):
    if not cond:
        _fail(field, value, fix)


def _choice(config, field: str, options):
    value = _get(config, field)
    _check(value in options, field, value, f"must be one of {', '.join(options)}")


def _get(config, field: str):
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def _positive_int(config, field: str, minimum: int = 1):
    value = _get(config, field)
    _check(isinstance(value, int) and value >= minimum, field, value, f"must be an integer >= {minimum}")


def _in_range(config, field: str, low: float, high: float, *, high_open=False, low_open=False):
    value = _get(config, field)
    ok = (
        isinstance(value, (int, float))
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    _check(ok, field, value, f"must be in {lo}{low}, {high}{hi}")


def validate(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
    """Raises :class:`ConfigError` for the first problem found."""
    _check(isinstance(config.seed, int), "seed", config.seed, "must be an integer")
    _positive_int(config, "global_batch_size")
    _positive_int(config, "grad_accum_steps")
    per_step = config.grad_accum_steps * num_devices
    _check(
        config.global_batch_size % per_step == 0,
        "global_batch_size",
        config.global_batch_size,
        f"must be a multiple of grad_accum_steps x devices = {config.grad_accum_steps} x {num_devices} = {per_step}",
    )
    _positive_int(config, "total_steps", minimum=0)
    _positive_int(config, "stop_at_step", minimum=0)
    if config.total_steps == 0:
        _in_range(config, "num_epochs", 0.0, float("inf"), low_open=True)
    _choice(config, "dtype", DTYPES)

    _check(
        config.model.name in models.BACKBONES,
        "model.name",
        config.model.name,
        f"unknown backbone; choose one of {', '.join(sorted(models.BACKBONES))}",
    )
    _positive_int(config, "model.embedding_dim")
    _in_range(config, "model.dropout", 0.0, 1.0, high_open=True)

    _choice(config, "head.name", HEADS)
    _in_range(config, "head.sample_rate", 0.0, 1.0)
    _in_range(config, "head.weight_decay", 0.0, float("inf"))
    _choice(config, "head.logits_dtype", DTYPES)
    try:
        CombinedMargin(**config.head.margin.to_dict())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.head.margin: {e} (set --config.head.margin.<field>=...)") from None

    _choice(config, "optimizer.name", OPTIMIZERS)
    _in_range(config, "optimizer.lr", 0.0, float("inf"), low_open=True)
    _in_range(config, "optimizer.momentum", 0.0, 1.0, high_open=True)
    _in_range(config, "optimizer.weight_decay", 0.0, float("inf"))
    _in_range(config, "optimizer.b1", 0.0, 1.0, high_open=True)
    _in_range(config, "optimizer.b2", 0.0, 1.0, high_open=True)
    _in_range(config, "optimizer.eps", 0.0, float("inf"), low_open=True)
    _in_range(config, "optimizer.clip_grad_norm", 0.0, float("inf"))

    _choice(config, "schedule.name", SCHEDULES)
    _in_range(config, "schedule.warmup_epochs", 0.0, float("inf"))
    _in_range(config, "schedule.power", 0.0, float("inf"), low_open=True)
    _in_range(config, "schedule.end_lr_factor", 0.0, 1.0)

    _choice(config, "data.source", SOURCES)
    _positive_int(config, "data.image_size", minimum=16)
    _positive_int(config, "data.threads")
    _positive_int(config, "data.workers", minimum=0)
    _choice(config, "data.sampler", SAMPLERS)
    _positive_int(config, "data.images_per_identity_in_batch")
    if config.data.sampler == "identity_balanced":
        k = config.data.images_per_identity_in_batch
        _check(
            config.global_batch_size % k == 0,
            "data.images_per_identity_in_batch",
            k,
            f"must divide global_batch_size ({config.global_batch_size})",
        )
    for name in ("flip", "blur", "downup", "color_jitter", "grayscale"):
        _in_range(config, f"data.augment.{name}", 0.0, 1.0)
    if config.data.source == "synthetic":
        _positive_int(config, "data.synthetic.num_identities")
        _positive_int(config, "data.synthetic.images_per_identity")
    else:
        what = {
            "recordio": "the folder with train.rec, train.idx and property",
            "tfds": "the TFDS data_dir",
            "folder": "the root of the identity folders",
        }
        _check(
            bool(config.data.path),
            "data.path",
            config.data.path,
            f"data.source={config.data.source!r} needs {what[config.data.source]}",
        )
        _check(os.path.isdir(config.data.path), "data.path", config.data.path, "no such directory")
        if config.data.source == "tfds":
            _check(
                bool(config.data.tfds_name),
                "data.tfds_name",
                config.data.tfds_name,
                "data.source='tfds' needs the dataset name given to pfc_jax.data.prepare",
            )

    _positive_int(config, "eval.every_steps", minimum=0)
    _positive_int(config, "eval.batch_size")
    for name in bin_names(config.eval.bins):
        if name != SYNTHETIC:
            path = resolve_bin(name, config.eval.dir or config.data.path)
            _check(
                path.is_file(),
                "eval.bins",
                config.eval.bins,
                f"{name!r} refers to {path}, which does not exist (set eval.dir to the folder with "
                "the .bin files, give a path ending in .bin, or use 'synthetic')",
            )

    _positive_int(config, "log_every_steps")
    _positive_int(config, "checkpoint_every_steps")
    _positive_int(config, "keep_checkpoints")
    _check(isinstance(config.tensorboard, bool), "tensorboard", config.tensorboard, "must be True or False")


def validate_run_length(config, *, total_steps: int, warmup_steps: int) -> None:
    """Checks derived lengths once the dataset size is known."""
    if total_steps < 1:
        raise ConfigError(
            f"the run has {total_steps} steps: config.num_epochs = {config.num_epochs} over the "
            f"dataset is less than one step of {config.global_batch_size} images "
            "(raise --config.num_epochs or set --config.total_steps)"
        )
    if warmup_steps >= total_steps:
        _fail(
            "schedule.warmup_epochs",
            config.schedule.warmup_epochs,
            f"warmup ({warmup_steps} steps) must be shorter than the run ({total_steps} steps)",
        )
    if config.stop_at_step > total_steps:
        _fail("stop_at_step", config.stop_at_step, f"must be <= the run's {total_steps} steps (0 = no early stop)")
