"""F²C: the Dynamic Class Pool (LRU semantics), the loss and its gradient, the dual
sampler, the config's requirements, memory, and whole runs (resume, resharding, EMA)."""

import copy
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax import checkpoint, heads, sharding, train
from pfc_jax.config_validation import ConfigError, validate
from pfc_jax.data import pipeline
from pfc_jax.heads import margins
from pfc_jax.heads.f2c import F2C, default_hard_negatives
from pfc_jax.heads.pool import ClassPool
from tests import recipes
from tests.test_data import Indexed, batches
from tests.test_dcq import _compiled_memory, assert_resumed_bit_identically, items, straight_resumed_and_moved
from tests.test_step import config as step_config


class PythonPool:
    """The pool's semantics written plainly, one feature at a time (pfc_jax.heads.pool)."""

    def __init__(self, size, dim):
        self.size, self.clock = size, 0
        self.labels, self.stamps, self.next = [-1] * size, [-1] * size, [0] * size
        self.views = np.zeros((size, 2, dim), np.float32)

    def slot_of(self, label):
        return self.labels.index(label) if label in self.labels else -1

    def insert(self, features, labels):
        labels = [int(x) for x in labels]
        before = {label: s for s, label in enumerate(self.labels) if label != -1}
        used = {before[label] for label in labels if label in before}
        slots = {}
        for label in labels:  # distinct misses, in order: empty slots first, then the oldest
            if label in slots:
                continue
            if label in before:
                slots[label] = before[label]
                continue
            free = [s for s in range(self.size) if s not in used]
            empty = [s for s in free if self.labels[s] == -1]
            slots[label] = empty[0] if empty else min(free, key=lambda s: self.stamps[s])
            used.add(slots[label])
        seen, refreshed = set(), set()
        for j, (feature, label) in enumerate(zip(features, labels, strict=True)):
            s = slots[label]
            if s in seen or label in before:
                refreshed.add(s)
            view = self.next[s] if (s in seen or label in before) else 0
            seen.add(s)
            self.views[s, view] = feature
            self.next[s], self.stamps[s], self.labels[s] = 1 - view, self.clock + j, label
        self.clock += len(labels)
        hits = len({label for label in labels if label in before})
        return [slots[label] for label in labels], refreshed, hits


def _random_history(pool, ref, steps, n, num_labels, rng):
    """``steps`` random insertions of ``n`` features into both pools, checked as they go."""
    state = jax.jit(pool.init, out_shardings=pool.shardings())()
    insert = jax.jit(pool.insert)
    for _ in range(steps):
        labels = rng.integers(0, num_labels, n).astype(np.int32)
        features = rng.normal(size=(n, pool.dim)).astype(np.float32)
        state, done = insert(state, features, labels)
        slots, refreshed, hits = ref.insert(features, labels)
        assert np.asarray(done.slots).tolist() == slots
        got = jax.device_get(state.slots)
        assert got["labels"][: pool.size].tolist() == ref.labels
        assert got["stamps"][: pool.size].tolist() == ref.stamps
        assert got["next_view"][: pool.size].tolist() == ref.next
        np.testing.assert_array_equal(got["views"][: pool.size], ref.views)
        assert set(np.flatnonzero(np.asarray(done.refreshed))) == refreshed
        assert int(done.hits) == hits
    return state


@pytest.mark.parametrize("devices", [1, 8])
def test_pool_matches_a_plain_lru_over_a_long_random_sequence(devices):
    """250 batches of 6 features into 13 slots (3 of them padding on 8 devices), labels
    from 30: inserts, refreshes, evictions of the least recent, duplicates in a batch."""
    pool = ClassPool(sharding.make_mesh(jax.devices()[:devices]), 13, 3)
    ref = PythonPool(13, 3)
    state = _random_history(pool, ref, 250, 6, 30, np.random.default_rng(devices))
    assert int(state.clock) == 250 * 6
    labels = np.arange(30, dtype=np.int32)
    assert np.asarray(jax.jit(pool.lookup)(state.slots["labels"], labels)).tolist() == [ref.slot_of(x) for x in labels]
    newest = pool.newest_per_label(state, 30)
    for label in range(30):
        s = ref.slot_of(label)
        if s < 0:
            assert np.isnan(newest[label]).all()
        else:
            np.testing.assert_array_equal(newest[label], ref.views[s, 1 - ref.next[s]])
    with pytest.raises(ValueError, match="the pool has 13 slots"):
        pool.insert(state, np.zeros((14, 3), np.float32), np.zeros(14, np.int32))


def reference_loss(emb, keys, labels, ref, margin, k):
    """F²C written plainly: both insertions on copies of the Python pool, full [b, Q]
    cosine matrices, log-softmax, top-k."""
    g = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    q = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
    total = 0.0
    kept = None
    for side, other in ((0, 1), (1, 0)):  # probes x see y's gallery, probes y see x's
        pool = copy.deepcopy(ref)
        _, refreshed, _ = pool.insert(g[other::2], labels[other::2])
        if side == 1:
            kept = pool
        probes, probe_labels = q[side::2], labels[side::2]
        used = np.asarray(pool.labels) >= 0
        targets = np.asarray([pool.slot_of(x) for x in probe_labels])
        w1 = np.where(np.isin(np.arange(pool.size), list(refreshed))[:, None], pool.views[:, 1], pool.views[:, 0])
        for w in (pool.views[:, 0], w1):
            cos = probes @ jnp.asarray(w).T
            onehot = np.arange(pool.size)[None, :] == targets[:, None]
            logits = jnp.where(used[None, :], margin(cos, onehot), -jnp.inf)
            ce = -jnp.sum(jnp.where(onehot, jax.nn.log_softmax(logits, axis=1), 0.0), axis=1)
            inside = targets >= 0
            total += jnp.sum(jnp.where(inside, ce, 0.0)) / max(inside.sum(), 1)
            top = jnp.sort(jnp.where(used[None, :], cos, -jnp.inf), axis=1)[:, ::-1][:, :k]
            penalty = jnp.mean(jnp.maximum(top, 0.0), axis=1)
            total += jnp.sum(jnp.where(inside, 0.0, penalty)) / max((~inside).sum(), 1)
    return total, kept


@pytest.mark.parametrize("margin_type", ["cosface", "arcface"])
def test_loss_and_gradient_match_a_plain_reference(margin_type):
    """8 devices, 13 slots with a history of 20 insertions; pairs of one identity (in the
    pool by their partner, or already) and pairs of two identities (in or out of the pool)."""
    mesh = sharding.make_mesh()
    d, size = 8, 13
    margin = margins.cosface(s=10.0, m=0.3) if margin_type == "cosface" else margins.arcface(s=10.0, m=0.3)
    head = F2C(mesh, num_classes=40, embedding_dim=d, pool_size=size, margin=margin, hard_negatives=4)
    rng = np.random.default_rng(3)
    ref = PythonPool(size, d)
    state = _random_history(head.pool, ref, 20, 6, 40, rng)
    in_pool = [x for x in ref.labels if x >= 0]
    outside = [x for x in range(40) if x not in ref.labels]
    # Pairs 0-3: one identity; pairs 4-7: x from the pool or not, y another identity.
    labels = [7, 7, 8, 8, in_pool[0], in_pool[0], outside[5], outside[5], in_pool[1], outside[0], outside[1]]
    labels = np.asarray([*labels, outside[2], outside[3], in_pool[2], outside[4], in_pool[3]], np.int32)
    emb = rng.normal(size=(16, d)).astype(np.float32)
    keys = rng.normal(size=(16, d)).astype(np.float32)
    batch = sharding.batch_sharding(mesh)
    emb_, keys_, labels_ = (jax.device_put(x, batch) for x in (emb, keys, labels))

    step = jax.jit(lambda st, e, lab, ks: heads.step(head, st, e, lab, jax.random.key(0), ks))
    new_state, grad, metrics = step(state, emb_, labels_, keys_)
    ref_loss = lambda e: reference_loss(e, keys, labels, ref, margin, 4)[0]
    want, want_grad = jax.value_and_grad(ref_loss)(jnp.asarray(emb))
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(want_grad).max()) > 1e-3
    assert 0 < float(metrics["in_pool"]) < 1  # both kinds of probe
    assert int(metrics["invalid_labels"]) == 0

    _, kept = reference_loss(emb, keys, labels, ref, margin, 4)
    got = jax.device_get(new_state.slots)
    assert got["labels"][:size].tolist() == kept.labels and got["next_view"][:size].tolist() == kept.next
    np.testing.assert_allclose(got["views"][:size], kept.views, rtol=1e-6, atol=1e-6)

    # The gallery features get no gradient: the Gallery Net is not trained.
    def loss_of_keys(ks):
        params, context, _ = head.prepare(state, labels_, jax.random.key(0), keys=ks)
        return head.micro_loss(params, context, emb_, 0)[0]

    assert not np.asarray(jax.jit(jax.grad(loss_of_keys))(keys_)).any()


def test_hard_negatives_follow_the_official_formula():
    assert [default_hard_negatives(q) for q in (100, 15_000, 30_000, 10**6)] == [3, 3, 6, 10]


# ---- the dual sampler ----------------------------------------------------------------


def test_dual_sampler_mixes_pairs_and_instances_covers_each_epoch_and_resumes():
    """Indexed(64): 16 identities of 4 images. Batches of 8 at fraction 0.5: 2 pairs
    (positions 0-3) and 4 instances; 8 batches pass over the identities once, 16 over the
    images once."""
    make = lambda **kw: pipeline.make_iterator(Indexed(64), global_batch=8, seed=5, image_size=16, sampler="dual", **kw)
    got = batches(make(), 32)
    for b in got:
        assert b[0] // 4 == b[1] // 4 and b[0] != b[1]  # two different images of one identity
        assert b[2] // 4 == b[3] // 4 and b[2] != b[3]
    for epoch in range(4):  # the identity stream: every identity once per 8 batches
        pairs = [x // 4 for b in got[8 * epoch : 8 * epoch + 8] for x in (b[0], b[2])]
        assert sorted(pairs) == list(range(16))
    for epoch in range(2):  # the instance stream: every image once per 16 batches
        seen = [x for b in got[16 * epoch : 16 * epoch + 16] for x in b[4:]]
        assert sorted(seen) == list(range(64))
    assert got[:8] != got[8:16]  # a new identity order each pass

    it = make(threads=1)
    batches(it, 5)
    state = it.state()
    resumed = make(threads=3)
    resumed.restore(state)
    assert batches(resumed, 9) == got[5:14]

    quarter = batches(make(identity_fraction=0.25), 2)  # 1 pair, 6 instances
    assert all(b[0] // 4 == b[1] // 4 for b in quarter)
    with pytest.raises(ValueError, match="dual/0.5.*this run has sampler='dual/0.25'"):
        make(identity_fraction=0.25).restore(state)
    with pytest.raises(ValueError, match="even global batch with at least one pair"):
        pipeline.make_iterator(Indexed(64), global_batch=7, seed=0, image_size=16, sampler="dual")


def test_dual_sampler_pairs_an_identity_of_one_image_with_itself():
    class OneEach(Indexed):
        def labels(self):
            return np.arange(self.n, dtype=np.int32)

    for b in batches(pipeline.make_iterator(OneEach(8), global_batch=4, seed=0, image_size=16, sampler="dual"), 4):
        assert b[0] == b[1]


# ---- config, memory ------------------------------------------------------------------


def test_config_requirements_and_their_errors():
    c = recipes.load("synthetic", ["--config.head.name=f2c"])
    assert heads.requirements(c) == heads.Requirements("dual", 2, True, "ema", 0.99)
    validate(c, num_devices=8)
    explicit = recipes.load("synthetic", ["--config.head.name=f2c", "--config.ema.momentum=0.9"])
    assert heads.requirements(explicit).ema_momentum == 0.9
    bad = {
        "--config.data.sampler=identity_balanced": "head 'f2c' needs 2 images of each identity in every batch: "
        "use dual",
        "--config.data.images_per_identity_in_batch=4": "the dual sampler's identities come in pairs",
        "--config.ema.enabled=off": "config.ema.enabled = 'off': head 'f2c' needs the EMA",
        "--config.head.f2c.pool_size=16": "must hold at least one step's 32 gallery features",
        "--config.head.f2c.margin_type=sphere": "config.head.f2c.margin_type",
        "--config.head.f2c.pool_fraction=0": "config.head.f2c.pool_fraction",
        "--config.data.identity_fraction=0": "config.data.identity_fraction",
        "--config.global_batch_size=24": "to be whole identities of 2 images",
    }
    for flag, message in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(recipes.load("synthetic", ["--config.head.name=f2c", flag]), num_devices=8)


def test_compiled_memory_does_not_depend_on_the_number_of_identities():
    """No identity -> slot table: the same program at 10^4 and 10^7 identities."""
    mesh = sharding.make_mesh()
    head = lambda n: F2C(mesh, num_classes=n, embedding_dim=32, pool_size=1024)
    sizes = {n: _compiled_memory(head(n), 64, 32) for n in (10**4, 10**7)}
    assert sizes[10**4] == sizes[10**7]
    assert sizes[10**4][1] > 1024 * 2 * 32 * 4 // 8  # the pool's block is among the arguments


def test_gradient_accumulation_trains_the_same_pool():
    """Two micro-batches: pairs stay whole (the micro-batch-major order keeps positions'
    parity), the step's insertion is the same set of identities, the loss is finite."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 16, 16, 3), dtype=np.uint8)
    pairs = np.repeat(rng.choice(50, (2, 8), replace=False), 2, axis=1)
    labels = np.concatenate([pairs, rng.integers(0, 50, (2, 16))], axis=1).astype(np.int32)
    pools = {}
    for k in (1, 2):
        c = step_config(head__name="f2c", head__f2c__pool_size=64, grad_accum_steps=k)
        mesh = sharding.make_mesh()
        setup = train.build(c, mesh, num_classes=50, num_examples=1000)
        state = setup.trainer.init(setup.params, setup.batch_stats, jax.random.key(0))
        step, batch = setup.trainer.jit(), sharding.batch_sharding(mesh)
        for b in range(2):
            state, metrics = step(state, jax.device_put(images[b], batch), jax.device_put(labels[b], batch))
            assert np.isfinite(float(metrics["loss"])) and float(metrics["in_pool"]) >= 0.5  # pairs always are
        pools[k] = sorted(jax.device_get(state.head.slots["labels"]).tolist())
    assert pools[1] == pools[2]


# ---- end to end: the real main in subprocesses ------------------------------------------

F2C_RUN = [
    "--config.head.name=f2c",
    "--config.head.f2c.pool_size=12",  # 8 gallery features per step: evictions from step 2
    "--config.checkpoint_every_steps=6",  # the resumed run starts from 6
]


@pytest.fixture(scope="module")
def f2c_runs(tmp_path_factory):
    """12 steps straight on 8 devices; stopped at 6 and resumed; continued on 1 device."""
    return straight_resumed_and_moved(tmp_path_factory.mktemp("f2c"), F2C_RUN)


def test_f2c_run_resumes_bit_identically(f2c_runs):
    straight = assert_resumed_bit_identically(f2c_runs)
    head = straight["train"]["head"]
    assert head["slots"]["views"].shape == (16, 2, 16)  # 12 slots padded for 8 devices
    assert int(head["clock"]) == 12 * 8 and (head["slots"]["labels"][:12] >= 0).all()
    records = [json.loads(line) for line in (f2c_runs["a"] / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["step"] == 12 and "loss" in r][0]
    for key in ("accuracy", "pool_fill", "in_pool", "pool_hits", "pool_evicted", "ema_distance"):
        assert np.isfinite(last[key]), key
    assert last["pool_fill"] == 1.0 and last["pool_evicted"] > 0
    evaluated = [r["eval/synthetic/accuracy"] for r in records if "eval/synthetic/accuracy" in r]
    # Its Gallery Net (the EMA) on held-out identities, above chance (0.5); the demo's
    # rise over a longer run is in the README.
    assert len(evaluated) == 1 and evaluated[0] > 0.6


def test_f2c_run_continues_on_one_device(f2c_runs):
    out = f2c_runs["out"]["one"]
    assert "resumed from checkpoint step 6" in out.stdout and "on 1 device(s)" in out.stdout
    here, there = items(f2c_runs["one"], 12), items(f2c_runs["a"], 12)
    head, ref = here["train"]["head"], there["train"]["head"]
    assert head["slots"]["views"].shape == (12, 2, 16)
    for field in ("labels", "stamps", "next_view"):
        np.testing.assert_array_equal(head["slots"][field], ref["slots"][field][:12], err_msg=field)
    assert int(head["clock"]) == int(ref["clock"])
    np.testing.assert_allclose(head["slots"]["views"], ref["slots"]["views"][:12], atol=1e-3)


def test_inference_tools_default_to_the_gallery_net(f2c_runs):
    _, _, step, which = checkpoint.load_backbone(f2c_runs["a"])
    assert step == 12 and which == "ema"
