"""The hard synthetic benchmark, the study's measurements and its runner.

No test here asserts a quality figure of the study: only the generator's properties,
the metrics against plain numpy, the head's sample counter against a replay of the
sampler, and the runner's files and resume.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from pfc_jax import optim, sharding
from pfc_jax.config_validation import ConfigError, validate
from pfc_jax.data import hard_synthetic as hard
from pfc_jax.errors import InputError
from pfc_jax.heads import margins
from pfc_jax.heads.partial_fc import PartialFC
from pfc_jax.study import metrics
from pfc_jax.study.arms import parse_arms
from tests.recipes import load as load_recipe

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ---- the generator ----------------------------------------------------------------------


def test_long_tail_counts_follow_the_configured_law_and_seed():
    world = hard.World(num_identities=4000, min_images=2, max_images=300, tail=1.1, seed=3)
    counts = hard.images_per_identity(world, 0, world.num_identities)
    assert counts.min() >= 2 and counts.max() <= 300
    # Pareto(1.1) from 2: P(n <= 5) = 1 - (2/6)^1.1 ~ 0.70, P(n >= 100) = (2/100)^1.1 ~ 1.3 %.
    assert 0.65 < np.mean(counts <= 5) < 0.75
    assert 20 < np.sum(counts >= 100) < 90
    np.testing.assert_array_equal(counts, hard.images_per_identity(world, 0, world.num_identities))
    other = hard.images_per_identity(hard.World(num_identities=4000, seed=4), 0, 4000)
    assert not np.array_equal(counts, other)
    # A slice of identities has the same counts as in the whole world.
    np.testing.assert_array_equal(hard.images_per_identity(world, 100, 50), counts[100:150])


def test_source_indexes_every_image_of_every_identity_deterministically():
    world = hard.World(num_identities=30, max_images=12, seed=1)
    source = hard.HardSyntheticIdentities(world, image_size=16)
    assert len(source) == source.counts.sum() and source.num_classes == 30
    labels = source.labels()
    for i in (0, 1, len(source) // 2, len(source) - 1):
        example = source[i]
        assert example["label"] == labels[i]
        assert example["image"].shape == (16, 16, 3) and example["image"].dtype == np.uint8
        np.testing.assert_array_equal(example["image"], source[i]["image"])
    # Two images of one identity differ (nuisance), and so does another world's.
    assert not np.array_equal(source.render(0, 0), source.render(0, 1))
    other = hard.HardSyntheticIdentities(hard.World(num_identities=30, max_images=12, seed=2), image_size=16)
    assert not np.array_equal(source.render(0, 0), other.render(0, 0))
    with pytest.raises(IndexError):
        source[len(source)]


def test_look_alikes_are_closer_than_strangers():
    world = hard.World(num_identities=400, family_size=4, family_spread=0.5, seed=0)
    source = hard.HardSyntheticIdentities(world, image_size=24)
    t = [source.template(i).ravel() for i in range(12)]
    within = np.mean([np.linalg.norm(t[f * 4] - t[f * 4 + k]) for f in range(3) for k in (1, 2, 3)])
    across = np.mean([np.linalg.norm(t[a] - t[b]) for a, b in ((0, 4), (1, 8), (5, 9), (2, 10))])
    assert within < across


def test_held_out_sets_are_whole_families_outside_training_and_disjoint():
    world = hard.World(num_identities=1001, family_size=4, seed=0)  # not a family multiple
    held = hard.HeldOut(pairs=40, pair_identities=10, tar_identities=6, images_each=3)
    pairs = hard.held_out(world, held, 16, "pairs")
    tar = hard.held_out(world, held, 16, "tar")
    train_families = {i // 4 for i in range(world.num_identities)}
    for source, count in ((pairs, 10), (tar, 6)):
        assert source.num_identities == count and (source.counts == 3).all()
        absolute = source.first + np.arange(source.num_identities)
        assert absolute.min() >= world.num_identities
        assert not train_families & {int(i) // 4 for i in absolute}
    assert pairs.first + pairs.num_identities <= tar.first

    images, issame = hard.verification_pairs(pairs, held.pairs)
    assert images.shape == (80, 16, 16, 3) and issame.sum() == 20 and len(issame) == 40
    again, _ = hard.verification_pairs(pairs, held.pairs)
    np.testing.assert_array_equal(images, again)
    tar_images, labels = hard.tar_set(tar)
    assert tar_images.shape == (18, 16, 16, 3)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(6), 3))


def test_bad_world_and_config_fields_are_refused_by_name():
    with pytest.raises(InputError, match="occlusion is a probability"):
        hard.World(occlusion=1.5)
    with pytest.raises(InputError, match="min_images <= max_images"):
        hard.World(min_images=5, max_images=3)
    config = load_recipe("study")
    config.data.hard_synthetic.tail = -1.0
    with pytest.raises(ConfigError, match=r"config\.data\.hard_synthetic: .*tail must be > 0"):
        validate(config, num_devices=8)
    config = load_recipe("study")
    config.data.hard_synthetic_eval.pairs = 5
    with pytest.raises(ConfigError, match=r"hard_synthetic_eval: .*pairs must be >= 10"):
        validate(config, num_devices=8)


# ---- the measurements -------------------------------------------------------------------


def test_staleness_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(7, 5))
    embeddings = rng.normal(size=(30, 5)) * rng.uniform(0.5, 3, (30, 1))
    labels = rng.integers(0, 6, 30)  # class 6 has no images
    got = metrics.staleness(weights, embeddings, labels)
    for c in range(7):
        rows = [e / np.linalg.norm(e) for e, y in zip(embeddings, labels) if y == c]
        if not rows:
            assert np.isnan(got[c])
            continue
        mean = np.sum(rows, axis=0)
        expected = mean @ weights[c] / (np.linalg.norm(mean) * np.linalg.norm(weights[c]))
        assert got[c] == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="labels outside"):
        metrics.staleness(weights, embeddings, np.full(30, 7))


def test_buckets_and_tar_over_all_pairs():
    cos = np.array([0.1, 0.2, 0.3, 0.9, np.nan])
    key = np.array([2, 2, 4, 120, 3])
    buckets = metrics.by_buckets(cos, key, ((1, 3), (3, 5), (100, None)))
    assert [b["classes"] for b in buckets] == [2, 1, 1]
    assert buckets[0]["mean"] == pytest.approx(0.15) and buckets[2]["mean"] == pytest.approx(0.9)
    assert metrics.quantile_buckets(np.full(10, 24)) == [(24, None)]
    assert metrics.quantile_buckets(np.arange(10), 2) == [(0, 4), (4, None)]

    # Identities on orthogonal axes, images slightly jittered: every genuine pair beats
    # every impostor, so TAR is 1 at any FAR.
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 3)
    embeddings = np.eye(8)[labels] + 0.01 * rng.normal(size=(12, 8))
    tar = metrics.tar_all_pairs(embeddings, labels, fars=(1e-1,))
    assert tar == {"tar_at_far_0.1": 1.0, "genuine_pairs": 12, "impostor_pairs": 54}


def test_partial_fc_sample_counts_match_a_replay_of_the_sampler():
    mesh = sharding.make_mesh()
    common = dict(
        num_classes=50, embedding_dim=8, sample_rate=0.3, margin=margins.arcface(), optimizer=optim.sgd(0.1, 0.9, 0.0)
    )
    counted = PartialFC(mesh, count_samples=True, **common)
    plain = PartialFC(mesh, **common)
    key = jax.random.key(0)
    state, reference = counted.init(key), plain.init(key)
    step_counted, step_plain = counted.jit_step(), plain.jit_step()
    expected = np.zeros(counted.num_classes_padded, np.int64)
    batch = sharding.batch_sharding(mesh)
    rng = np.random.default_rng(0)
    for i in range(4):
        embeddings = jax.device_put(rng.normal(size=(16, 8)).astype(np.float32), batch)
        labels = jax.device_put(rng.integers(0, 50, 16).astype(np.int32), batch)
        k = jax.random.fold_in(key, i)
        sample = jax.device_get(counted.sample(labels, k))
        index = np.asarray(sample.index).reshape(counted.num_shards, -1)
        active = np.asarray(sample.active).reshape(counted.num_shards, -1)
        for shard in range(counted.num_shards):
            rows = shard * counted.num_local + index[shard][active[shard]]
            np.add.at(expected, rows, 1)
        state, _, _ = step_counted(state, embeddings, labels, k)
        reference, _, _ = step_plain(reference, embeddings, labels, k)
    np.testing.assert_array_equal(np.asarray(jax.device_get(counted.sample_counts(state))), expected[:50])
    assert plain.sample_counts(reference) is None
    # Counting changes nothing else.
    np.testing.assert_array_equal(np.asarray(state.centers), np.asarray(reference.centers))
    assert counted.class_weights(state).shape == (50, 8)


def test_arms_parse_and_refuse_bad_specs():
    arms = parse_arms("partial_fc:rate=1.0, partial_fc:rate=0.1:margin.m2=0.4")
    assert [a.name for a in arms] == ["partial_fc:sample_rate=1.0", "partial_fc:sample_rate=0.1:margin.m2=0.4"]
    config = arms[1].apply(load_recipe("study"))
    assert config.head.sample_rate == 0.1 and config.head.margin.m2 == 0.4
    assert "=" in arms[0].slug and ":" not in arms[0].slug
    for spec, error in (
        ("nohead:rate=1", "unknown head 'nohead'"),
        ("partial_fc:rate", "not field=value"),
        ("partial_fc:rate=1.0,partial_fc:sample_rate=1.0", "given twice"),
        ("", "no arm given"),
    ):
        with pytest.raises(InputError, match=error):
            parse_arms(spec)
    with pytest.raises(InputError, match="no field 'nope'"):
        parse_arms("partial_fc:nope=1")[0].apply(load_recipe("study"))
    with pytest.raises(InputError, match="must be a number"):
        parse_arms("partial_fc:rate=lots")[0].apply(load_recipe("study"))


# ---- the runner -------------------------------------------------------------------------

ARMS = "partial_fc:rate=1.0,partial_fc:rate=0.25"
TINY = ["--config.model.name=mlp", "--config.model.embedding_dim=16"]


def _command(out):
    return [
        sys.executable,
        "-m",
        "pfc_jax.study",
        "--config",
        str(ROOT / "configs" / "study.py"),
        "--quick",
        f"--arms={ARMS}",
        f"--out={out}",
        "--staleness_images=1",
        *TINY,
    ]


def test_study_writes_its_summary_and_resumes_after_a_kill(tmp_path):
    out = tmp_path / "study"
    first, second = out / "partial_fc-sample_rate=1.0" / "seed0", out / "partial_fc-sample_rate=0.25" / "seed0"
    # The first arm finishes; the second is stopped by SIGTERM right after its first step.
    child = subprocess.Popen(
        _command(out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy()
    )
    seen, in_second = [], False
    for line in child.stdout:
        seen.append(line)
        in_second = in_second or line.startswith("== partial_fc:sample_rate=0.25 seed 0: training")
        if in_second and line.startswith("[ 1/24]"):
            child.send_signal(signal.SIGTERM)
            break
    rest = child.communicate(timeout=300)[0]
    log = "".join(seen) + rest
    assert child.returncode == 1, log
    assert "stopped at step" in rest and "run the same command again to resume" in rest, log
    assert (first / "result.json").exists() and not (second / "result.json").exists()
    assert any((second / "checkpoints").iterdir())
    finished = (first / "result.json").stat().st_mtime_ns

    rerun = subprocess.run(_command(out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "== partial_fc:sample_rate=1.0 seed 0: finished before, not retrained" in rerun.stdout
    assert "== partial_fc:sample_rate=0.25 seed 0: resuming" in rerun.stdout
    assert "resumed from checkpoint step" in rerun.stdout
    assert (first / "result.json").stat().st_mtime_ns == finished

    summary = json.loads((out / "study.json").read_text())
    assert list(summary["arms"]) == ["partial_fc:sample_rate=1.0", "partial_fc:sample_rate=0.25"]
    for arm in summary["arms"].values():
        assert set(arm["tar"]) == {"tar_at_far_0.001", "tar_at_far_0.0001"}
        assert arm["curve"]["synthetic"][-1][0] == 24
        assert arm["staleness_by_images"] and arm["staleness_by_samples"]
        assert arm["head_memory"]["state_bytes"] > 0
    # Full softmax: every class is sampled at every step, so one bucket of 24.
    assert summary["arms"]["partial_fc:sample_rate=1.0"]["staleness_by_samples"][0]["low"] == 24
    table = (out / "study.md").read_text()
    assert "| `partial_fc:sample_rate=0.25` |" in table and "TAR@FAR=1e-4" in table
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same folder with another config is refused, naming the difference.
    changed = subprocess.run(
        [*_command(out), "--config.optimizer.lr=0.5"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert changed.returncode == 2 and "optimizer.lr: 0.1 there, 0.5 now" in changed.stderr, changed.stderr
