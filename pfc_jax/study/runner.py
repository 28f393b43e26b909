"""Runs a study: every arm x seed trained and measured in its own workdir, then summed up.

``OUT/<arm>/seed<k>/`` is an ordinary training workdir (checkpoints, metrics.jsonl,
config.json) plus ``result.json``, written atomically once the run is trained and
measured. A rerun skips every run that has its ``result.json`` and resumes any other
from its newest checkpoint, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import pathlib
import statistics
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from pfc_jax import evaluation, heads, sharding
from pfc_jax.data.augment import decode
from pfc_jax.data.sources import make_source
from pfc_jax.errors import InputError, RunError
from pfc_jax.study import metrics, report
from pfc_jax.study.arms import Arm
from pfc_jax.study.report import write_atomic

RESULT = "result.json"


@dataclasses.dataclass(frozen=True)
class Options:
    """How much of the training set the staleness figures embed."""

    staleness_images: int = 2  # per class
    staleness_classes: int = 20_000  # at most; a seeded random subset beyond


def _config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _check_same_config(path: pathlib.Path, config, what: str) -> None:
    """Refuses to reuse a run made with another config (a study's results must be comparable)."""
    saved = json.loads(path.read_text())
    saved = saved.get("config", saved)
    here = _config_dict(config)
    if saved != here:
        diff = _first_difference(saved, here)
        raise InputError(
            f"{what} in {path.parent} was made with another config ({diff}); rerun with the same "
            "--config and overrides, or give a new --out"
        )


def _first_difference(a, b, prefix="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {a!r} there, {b!r} now"


def run_study(
    config: ml_collections.ConfigDict,
    arms: list[Arm],
    seeds: int,
    out: str | pathlib.Path,
    *,
    options: Options = Options(),
    say=print,
) -> dict:
    """Trains and measures every arm x seed (skipping finished ones), then writes
    ``study.json``, ``study.md`` and ``study.png`` into ``out``; returns the summary."""
    if seeds < 1:
        raise InputError(f"--seeds must be >= 1, got {seeds}")
    out = pathlib.Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for arm in arms:
        for k in range(seeds):
            run_config = arm.apply(config)
            run_config.seed = config.seed + k
            run_config.head.count_samples = True  # heads that keep no counts ignore it
            workdir = out / arm.slug / f"seed{k}"
            results.setdefault(arm.name, []).append(
                run_one(run_config, workdir, arm=arm, options=options, say=say, label=f"{arm.name} seed {k}")
            )
    summary = report.summarize(config, results, seeds)
    report.write(summary, out, say=say)
    return summary


def run_one(config, workdir: pathlib.Path, *, arm: Arm, options: Options, say, label: str) -> dict:
    """One arm x seed: trained (or resumed), then measured; ``result.json`` is its record."""
    from pfc_jax import train

    result_path = workdir / RESULT
    if result_path.exists():
        _check_same_config(result_path, config, "the finished run")
        say(f"== {label}: finished before, not retrained ({result_path})")
        return json.loads(result_path.read_text())
    if (workdir / "config.json").exists():
        _check_same_config(workdir / "config.json", config, "the unfinished run")
        say(f"== {label}: resuming in {workdir}")
    else:
        say(f"== {label}: training in {workdir}")
    start = time.perf_counter()
    state = train.train_and_evaluate(config, workdir)
    source = make_source(config.data)
    steps, total = int(jax.device_get(state.step)), train.run_length(config, len(source))[0]
    if steps < total:
        raise RunError(
            f"{label} stopped at step {steps} of {total} (SIGTERM or config.stop_at_step); its checkpoint is "
            f"in {workdir}: run the same command again to resume"
        )
    say(f"== {label}: measuring")
    trained = time.perf_counter()
    measured = measure(config, state, source, workdir, options)
    result = {
        "arm": arm.name,
        "seed": int(config.seed),
        "steps": steps,
        "train_session_s": trained - start,  # this session's training (a resumed run: its last part)
        "measure_s": time.perf_counter() - trained,
        **measured,
        "config": _config_dict(config),
    }
    write_atomic(result_path, json.dumps(result, indent=1))
    say(f"== {label}: done ({result_path})")
    return result


# ---- measurements ------------------------------------------------------------------------


def measure(config, state, source, workdir: pathlib.Path, options: Options) -> dict:
    """Held-out verification, TAR@FAR (hard_synthetic's 1:1 set), staleness, throughput
    and head memory of a trained state (``source``: the training set)."""
    from pfc_jax import train
    from pfc_jax.inference import Embedder

    mesh = sharding.make_mesh()
    setup = train.build(config, mesh, num_classes=source.num_classes, num_examples=len(source))
    model = nnx.merge(setup.trainer.graphdef, setup.params, setup.batch_stats)
    embedder = Embedder(model, batch_size=config.eval.batch_size, mesh=mesh)
    embedder.set_weights(*train.eval_weights(state, setup.meta["eval_encoder"]))  # DCQ: the EMA

    pair_sets = evaluation.make_pair_sets(config)
    verification = {name: r.metrics() for name, r in evaluation.run_pair_sets(pair_sets, embedder).items()}
    tar = None
    if config.data.source == "hard_synthetic":
        from pfc_jax.data import hard_synthetic as hard

        held = hard.held_out(
            hard.World.from_config(config.data.hard_synthetic),
            hard.HeldOut.from_config(config.data.hard_synthetic_eval),
            config.data.image_size,
            "tar",
        )
        images, labels = hard.tar_set(held)
        tar = metrics.tar_all_pairs(embedder(images, flip=True), labels)

    head = setup.trainer.head
    return {
        "verification": verification,
        "tar": tar,
        "staleness": _staleness(config, head, state, source, embedder, options),
        "images_per_sec": _throughput(workdir),
        "head_memory": head_memory(head, state.head, config.global_batch_size, config.model.embedding_dim),
        "curve": _curve(workdir),
    }


def _staleness(config, head, state, source, embedder, options: Options) -> dict | None:
    if not hasattr(head, "class_weights"):
        return None
    labels = source.labels()
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(source.num_classes + 1))
    images_per_class = np.diff(starts)
    classes = np.arange(source.num_classes)
    if len(classes) > options.staleness_classes:
        rng = np.random.default_rng([config.seed, 11])
        classes = np.sort(rng.choice(classes, options.staleness_classes, replace=False))
    picked = np.concatenate(
        [order[starts[c] : starts[c] + min(options.staleness_images, images_per_class[c])] for c in classes]
    )
    size, chunk = config.data.image_size, 8192  # images held at once
    parts = []
    with concurrent.futures.ThreadPoolExecutor(config.data.threads) as pool:
        for start in range(0, len(picked), chunk):
            load = lambda i: decode(source[int(i)], size)
            images = np.stack(list(pool.map(load, picked[start : start + chunk], chunksize=256)))
            parts.append(embedder(images, flip=False))
    embeddings = np.concatenate(parts)
    weights = np.asarray(jax.device_get(head.class_weights(state.head)))
    remap = np.full(source.num_classes, -1)
    remap[classes] = np.arange(len(classes))
    cos = metrics.staleness(weights[classes], embeddings, remap[labels[picked]])
    out = {
        "classes": int(len(classes)),
        "images_per_class": options.staleness_images,
        "mean": float(np.nanmean(cos)),
        "by_images": metrics.by_buckets(cos, images_per_class[classes], metrics.IMAGE_BUCKETS),
        "by_samples": None,
    }
    counts = head.sample_counts(state.head) if hasattr(head, "sample_counts") else None
    if counts is not None:
        counts = np.asarray(jax.device_get(counts))[classes]
        out["by_samples"] = metrics.by_buckets(cos, counts, metrics.quantile_buckets(counts))
    return out


def _records(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _throughput(workdir: pathlib.Path) -> float | None:
    """Median training images/s over the logged intervals (the first step, which pays
    for warm-up, left out)."""
    rates = [r["samples_per_sec"] for r in _records(workdir) if "samples_per_sec" in r and r["step"] > 1]
    return statistics.median(rates) if rates else None


def _curve(workdir: pathlib.Path) -> dict[str, list[list[float]]]:
    """``{pair set: [[step, accuracy], ...]}`` from the evaluations during training."""
    curves: dict[str, dict[int, float]] = {}
    for record in _records(workdir):
        for key, value in record.items():
            if key.startswith("eval/") and key.endswith("/accuracy"):
                curves.setdefault(key[len("eval/") : -len("/accuracy")], {})[record["step"]] = value
    return {name: [[s, v] for s, v in sorted(points.items())] for name, points in curves.items()}


def head_memory(head, head_state, global_batch: int, dim: int) -> dict:
    """Per device: the head's state, and XLA's temporaries of one whole head step."""
    state_bytes = 0
    for leaf in jax.tree.leaves(head_state):
        shard = leaf.sharding.shard_shape(leaf.shape)
        state_bytes += math.prod(shard) * leaf.dtype.itemsize
    mesh = head.mesh
    batch = sharding.batch_sharding(mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), head_state)
    embeddings = jax.ShapeDtypeStruct((global_batch, dim), np.float32, sharding=batch)
    keys = embeddings if getattr(head, "key_encoder", None) else None  # DCQ: the EMA's embeddings
    compiled = (
        jax.jit(functools.partial(heads.step, head), donate_argnums=0)
        .lower(
            abstract,
            embeddings,
            jax.ShapeDtypeStruct((global_batch,), np.int32, sharding=batch),
            jax.random.key(0),
            keys,
        )
        .compile()
    )
    memory = compiled.memory_analysis()
    return {"state_bytes": state_bytes, "step_temp_bytes": None if memory is None else memory.temp_size_in_bytes}
