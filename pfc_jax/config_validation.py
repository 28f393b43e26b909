"""Checks a run's config before anything is built or compiled.

Every error names the field, the bad value and how to fix it, as a :class:`ConfigError`.
Names chosen from a registry (``model.name``, ``head.name``, ``optimizer.name``,
``schedule.name``, ``data.source``, ``data.sampler``, the dtypes) are checked against
that registry, and the fields of a head or a data source are checked by its registry
entry, so a new head or source needs nothing here.
"""

from __future__ import annotations

import os

import ml_collections

from pfc_jax import heads, models, optim
from pfc_jax.data.pipeline import SAMPLERS
from pfc_jax.data.sources import SOURCES
from pfc_jax.errors import InputError
from pfc_jax.evaluation import SYNTHETIC, bin_names, resolve_bin


class ConfigError(InputError):
    """An invalid configuration; the message says which field and how to fix it."""


class Check:
    """Field checks on one config; each raises :class:`ConfigError` naming the field."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    def get(self, field: str):
        node = self.config
        for part in field.split("."):
            node = node[part]
        return node

    def fail(self, field: str, value, fix: str):
        raise ConfigError(f"config.{field} = {value!r}: {fix} (set --config.{field}=...)")

    def fail_group(self, group: str, error: Exception):
        """A problem found by a constructor that takes a whole group of fields."""
        raise ConfigError(f"config.{group}: {error} (set --config.{group}.<field>=...)")

    def that(self, cond: bool, field: str, value, fix: str):
        if not cond:
            self.fail(field, value, fix)

    def choice(self, field: str, registry):
        """The field must name an entry of ``registry`` (a dict or a sequence of names)."""
        value = self.get(field)
        self.that(value in registry, field, value, f"must be one of {', '.join(registry)}")

    def positive_int(self, field: str, minimum: int = 1):
        value = self.get(field)
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        self.that(ok, field, value, f"must be an integer >= {minimum}")

    def in_range(self, field: str, low: float, high: float, *, high_open=False, low_open=False):
        value = self.get(field)
        ok = (
            isinstance(value, (int, float))
            and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high)
        )
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        self.that(ok, field, value, f"must be in {lo}{low}, {high}{hi}")


def validate(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
    """Raises :class:`ConfigError` for the first problem found."""
    c = Check(config)
    c.that(isinstance(config.seed, int), "seed", config.seed, "must be an integer")
    c.positive_int("global_batch_size")
    c.positive_int("grad_accum_steps")
    per_step = config.grad_accum_steps * num_devices
    c.that(
        config.global_batch_size % per_step == 0,
        "global_batch_size",
        config.global_batch_size,
        f"must be a multiple of grad_accum_steps x devices = {config.grad_accum_steps} x {num_devices} = {per_step}",
    )
    c.positive_int("total_steps", minimum=0)
    c.positive_int("stop_at_step", minimum=0)
    if config.total_steps == 0:
        c.in_range("num_epochs", 0.0, float("inf"), low_open=True)
    c.choice("dtype", models.DTYPES)
    c.that(isinstance(config.init_from, str), "init_from", config.init_from, "must be a workdir path or ''")
    c.that(
        isinstance(config.init_from_centers, bool),
        "init_from_centers",
        config.init_from_centers,
        "must be True or False",
    )
    c.that(
        not config.init_from_centers or config.init_from,
        "init_from_centers",
        config.init_from_centers,
        "needs config.init_from (the converted workdir whose centers to load)",
    )

    c.choice("model.name", models.BACKBONES)
    c.positive_int("model.embedding_dim")
    c.in_range("model.dropout", 0.0, 1.0, high_open=True)

    c.that(
        isinstance(config.data.keep_list, str),
        "data.keep_list",
        config.data.keep_list,
        "must be '' or the path of a keep.npy written by pfc_jax.data.prune",
    )
    c.choice("head.name", heads.HEADS)
    c.choice("data.sampler", ("auto", *SAMPLERS))
    c.positive_int("data.images_per_identity_in_batch", minimum=0)
    c.in_range("data.identity_fraction", 0.0, 1.0, low_open=True)
    c.choice("ema.enabled", ("auto", "on", "off"))
    c.in_range("ema.momentum", 0.0, 1.0, high_open=True)  # 0: the head's
    c.choice("eval.encoder", ("auto", "online", "ema"))
    _check_requirements(c, num_devices)
    heads.HEADS[config.head.name].check(c)

    c.choice("optimizer.name", optim.OPTIMIZERS)
    c.in_range("optimizer.lr", 0.0, float("inf"), low_open=True)
    c.in_range("optimizer.momentum", 0.0, 1.0, high_open=True)
    c.in_range("optimizer.weight_decay", 0.0, float("inf"))
    c.in_range("optimizer.b1", 0.0, 1.0, high_open=True)
    c.in_range("optimizer.b2", 0.0, 1.0, high_open=True)
    c.in_range("optimizer.eps", 0.0, float("inf"), low_open=True)
    c.in_range("optimizer.clip_grad_norm", 0.0, float("inf"))

    c.choice("schedule.name", optim.SCHEDULES)
    c.in_range("schedule.warmup_epochs", 0.0, float("inf"))
    c.in_range("schedule.power", 0.0, float("inf"), low_open=True)
    c.in_range("schedule.end_lr_factor", 0.0, 1.0)
    c.in_range("schedule.decay_factor", 0.0, 1.0, low_open=True)
    milestones = list(c.config.schedule.milestones)
    c.that(
        all(isinstance(m, (int, float)) and m > 0 for m in milestones) and milestones == sorted(set(milestones)),
        "schedule.milestones",
        milestones,
        "must be increasing positive epochs, e.g. [8, 14, 20]",
    )
    c.that(
        c.config.schedule.name != "step" or bool(milestones),
        "schedule.milestones",
        milestones,
        "the step schedule needs at least one milestone (epochs), e.g. (8, 14, 20)",
    )

    c.choice("data.source", SOURCES)
    c.positive_int("data.image_size", minimum=16)
    c.positive_int("data.threads")
    c.positive_int("data.workers", minimum=0)
    for name in config.data.augment:
        c.in_range(f"data.augment.{name}", 0.0, 1.0)
    source = SOURCES[config.data.source]
    if source.path:
        path = config.data.path
        c.that(bool(path), "data.path", path, f"data.source={config.data.source!r} needs {source.path}")
        c.that(os.path.isdir(path), "data.path", path, "no such directory")
    source.check(c)

    c.positive_int("eval.every_steps", minimum=0)
    c.positive_int("eval.batch_size")
    for name in bin_names(config.eval.bins):
        if name != SYNTHETIC:
            path = resolve_bin(name, config.eval.dir or config.data.path)
            c.that(
                path.is_file(),
                "eval.bins",
                config.eval.bins,
                f"{name!r} refers to {path}, which does not exist (set eval.dir to the folder with "
                "the .bin files, give a path ending in .bin, or use 'synthetic')",
            )

    c.positive_int("log_every_steps")
    c.positive_int("checkpoint_every_steps")
    c.positive_int("keep_checkpoints")
    c.that(isinstance(config.tensorboard, bool), "tensorboard", config.tensorboard, "must be True or False")


def _check_requirements(c: Check, num_devices: int) -> None:
    """The sampler, EMA and evaluated encoder the head needs (:func:`heads.requirements`)."""
    config = c.config
    entry, need = heads.HEADS[config.head.name], heads.requirements(config)
    name, k = config.head.name, need.images_per_identity
    if need.sampler == "identity_balanced":
        c.that(
            config.global_batch_size % k == 0,
            "data.images_per_identity_in_batch",
            k,
            f"must divide global_batch_size ({config.global_batch_size})",
        )
    if need.sampler == "dual":
        c.that(
            config.global_batch_size % 2 == 0,
            "global_batch_size",
            config.global_batch_size,
            "the dual sampler makes pairs: use an even global batch",
        )
        c.that(
            config.data.images_per_identity_in_batch in (0, 2),
            "data.images_per_identity_in_batch",
            config.data.images_per_identity_in_batch,
            "the dual sampler's identities come in pairs: use 2 or 0",
        )
    if entry.images_per_identity:
        c.that(
            need.sampler in entry.samplers,
            "data.sampler",
            config.data.sampler,
            f"head {name!r} needs {entry.images_per_identity} images of each identity in every batch: "
            f"use {' or '.join(entry.samplers)} (or auto)",
        )
        c.that(
            k >= entry.images_per_identity,
            "data.images_per_identity_in_batch",
            k,
            f"head {name!r} needs >= {entry.images_per_identity} images per identity (0 = its default)",
        )
        rows = config.global_batch_size // (num_devices * config.grad_accum_steps)
        c.that(
            rows % k == 0,
            "global_batch_size",
            config.global_batch_size,
            f"head {name!r} needs each device's micro-batch ({rows} images = global batch / (devices x "
            f"grad_accum_steps)) to be whole identities of {k} images: use a multiple of {num_devices} x "
            f"{config.grad_accum_steps} x {k}",
        )
    if entry.key_encoder == "ema":
        c.that(need.ema, "ema.enabled", config.ema.enabled, f"head {name!r} needs the EMA of the backbone: auto or on")
    if need.eval_encoder == "ema":
        c.that(need.ema, "ema.enabled", config.ema.enabled, "eval.encoder = ema needs an EMA: auto or on")


def validate_run_length(config, *, total_steps: int, warmup_steps: int) -> None:
    """Checks derived lengths once the dataset size is known."""
    c = Check(config)
    if total_steps < 1:
        raise ConfigError(
            f"the run has {total_steps} steps: config.num_epochs = {config.num_epochs} over the "
            f"dataset is less than one step of {config.global_batch_size} images "
            "(raise --config.num_epochs or set --config.total_steps)"
        )
    if warmup_steps >= total_steps:
        c.fail(
            "schedule.warmup_epochs",
            config.schedule.warmup_epochs,
            f"warmup ({warmup_steps} steps) must be shorter than the run ({total_steps} steps)",
        )
    if config.stop_at_step > total_steps:
        c.fail("stop_at_step", config.stop_at_step, f"must be <= the run's {total_steps} steps (0 = no early stop)")
