"""Prototype Memory: the memory's semantics (refresh, enqueue, dequeue the oldest), the
loss and its gradient (through the new prototypes or not), the config's requirements,
memory, and whole runs (resume, resharding)."""

import collections
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax import heads, sharding, train
from pfc_jax.config_validation import ConfigError, validate
from pfc_jax.heads import margins
from pfc_jax.heads.prototype_memory import PrototypeMemory
from tests import recipes
from tests.test_dcq import _compiled_memory, assert_resumed_bit_identically, items, straight_resumed_and_moved
from tests.test_step import config as step_config


def _normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class PlainMemory:
    """The memory written plainly: an ordered dict label -> prototype, oldest first."""

    def __init__(self, size):
        self.size, self.items = size, collections.OrderedDict()

    @staticmethod
    def prototypes(embeddings, labels):
        x = _normalize(embeddings)
        return {int(c): _normalize(x[labels == c].mean(axis=0)) for c in np.unique(labels)}

    def update(self, embeddings, labels):
        """Refresh the batch's identities already here, enqueue the others (dequeuing the
        oldest not in the batch when full); the batch's identities become the newest, in
        the order of their last image. Returns (refreshed, enqueued, dequeued)."""
        labels = [int(x) for x in labels]
        new = self.prototypes(embeddings, np.asarray(labels))
        distinct = list(dict.fromkeys(labels))
        refreshed = [c for c in distinct if c in self.items]
        enqueued = [c for c in distinct if c not in self.items]
        dequeued = 0
        for c in enqueued:
            if len(self.items) >= self.size:
                del self.items[next(k for k in self.items if k not in new)]
                dequeued += 1
            self.items[c] = None
        last = {c: j for j, c in enumerate(labels)}
        for c in sorted(distinct, key=last.get):
            self.items[c] = new[c]
            self.items.move_to_end(c)
        return len(refreshed), len(enqueued), dequeued


def _in_memory(head, state):
    """label -> prototype of the head's memory, oldest first (by the slots' stamps)."""
    got = jax.device_get(state.slots)
    labels = got["labels"][: head.memory_size]
    order = [s for s in np.argsort(got["stamps"][: head.memory_size], kind="stable") if labels[s] >= 0]
    return collections.OrderedDict((int(labels[s]), got["views"][s, 0]) for s in order)


def _history(devices, steps=120, rng_seed=0):
    """``steps`` random batches of 8 (labels from 30, any duplicates) through a memory of
    13 slots (3 of them padding on 8 devices), checked against PlainMemory as they go."""
    mesh = sharding.make_mesh(jax.devices()[:devices])
    head = PrototypeMemory(mesh, num_classes=30, embedding_dim=4, memory_size=13)
    ref = PlainMemory(13)
    rng = np.random.default_rng(rng_seed)
    state = jax.jit(head.init_state, out_shardings=head.state_shardings())(jax.random.key(0))
    batch = sharding.batch_sharding(mesh)
    step = jax.jit(lambda s, e, lab: heads.step(head, s, e, lab, jax.random.key(0)))
    for _ in range(steps):
        labels = rng.integers(0, 30, 8).astype(np.int32)
        emb = rng.normal(size=(8, 4)).astype(np.float32)
        state, _, metrics = step(state, jax.device_put(emb, batch), jax.device_put(labels, batch))
        counts = ref.update(emb, labels)
        assert (int(metrics["memory_refreshed"]), int(metrics["memory_enqueued"]), int(metrics["memory_dequeued"])) == (
            counts
        )
        got = _in_memory(head, state)
        assert list(got) == list(ref.items)  # the same identities, in the same age order
        for c, proto in ref.items.items():
            np.testing.assert_allclose(got[c], proto, rtol=1e-5, atol=1e-6)
    return head, state


@pytest.mark.parametrize("devices", [1, 8])
def test_memory_matches_a_plain_reference_over_a_long_random_sequence(devices):
    head, state = _history(devices)
    weights = head.class_weights(state)
    in_memory = _in_memory(head, state)
    for c in range(30):
        if c in in_memory:
            np.testing.assert_array_equal(weights[c], in_memory[c])
        else:
            assert np.isnan(weights[c]).all()


def test_one_and_eight_devices_keep_the_same_memory():
    (_, one), (_, eight) = _history(1, steps=40, rng_seed=5), _history(8, steps=40, rng_seed=5)
    a, b = jax.device_get(one.slots), jax.device_get(eight.slots)
    for field in ("labels", "stamps"):
        np.testing.assert_array_equal(a[field], b[field][:13], err_msg=field)
    np.testing.assert_allclose(a["views"], b["views"][:13], rtol=1e-6, atol=1e-7)


def reference_loss(emb, labels, memory, margin, through, positive="all"):
    """The loss written plainly: the memory after the update as a dense [M', D] matrix
    (the batch's identities with their new prototypes), full cosines, the margin on the
    target by its own formula, log-softmax."""
    after = PlainMemory(memory.size)
    after.items = collections.OrderedDict(memory.items)
    after.update(np.ones(emb.shape), labels)  # which identities and in which order (values below)
    x = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
    same = jnp.asarray(labels[:, None] == labels[None, :], jnp.float32)
    new = same @ x
    new = new / jnp.linalg.norm(new, axis=1, keepdims=True)
    if not through:
        new = jax.lax.stop_gradient(new)
    first = {int(c): int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)}
    rows = [new[first[c]] if c in first else jnp.asarray(p, jnp.float32) for c, p in after.items.items()]
    cos = x @ jnp.stack(rows).T
    target = np.asarray([list(after.items).index(int(c)) for c in labels])
    onehot = jax.nn.one_hot(target, len(rows), dtype=bool)
    t = jnp.sum(jnp.where(onehot, cos, 0.0), axis=1)
    if positive == "leave_one_out":  # the mean of the identity's other images
        others = same * (1.0 - jnp.eye(len(labels)))
        own = others @ x
        own = own / jnp.linalg.norm(own, axis=1, keepdims=True)
        if not through:
            own = jax.lax.stop_gradient(own)
        t = jnp.sum(x * own, axis=1)
    t = jnp.cos(jnp.arccos(t) + margin.m2) - margin.m3
    logits = margin.s * jnp.where(onehot, t[:, None], cos)
    return -jnp.mean(jnp.sum(jnp.where(onehot, jax.nn.log_softmax(logits), 0.0), axis=1))


@pytest.mark.parametrize(
    ("margin_type", "through", "positive"),
    [("arcface", True, "all"), ("arcface", False, "leave_one_out"), ("cosface", True, "leave_one_out")],
)
def test_loss_and_gradient_match_a_plain_reference(margin_type, through, positive):
    """8 devices, 20 slots after a history of 12 batches; a batch of identities of 2
    images, some already in memory (refreshed), some not (enqueued, dequeuing the oldest)."""
    mesh = sharding.make_mesh()
    d = 16
    margin = margins.cosface(s=10.0, m=0.3) if margin_type == "cosface" else margins.arcface(s=10.0, m=0.3)
    head = PrototypeMemory(
        mesh,
        num_classes=40,
        embedding_dim=d,
        memory_size=20,
        margin=margin,
        gradient_through_prototypes=through,
        positive=positive,
    )
    rng = np.random.default_rng(3)
    ref = PlainMemory(20)
    state = jax.jit(head.init_state, out_shardings=head.state_shardings())(jax.random.key(0))
    batch = sharding.batch_sharding(mesh)
    step = jax.jit(lambda s, e, lab: heads.step(head, s, e, lab, jax.random.key(0)))
    for _ in range(12):
        labels = rng.integers(0, 40, 8).astype(np.int32)
        emb = rng.normal(size=(8, d)).astype(np.float32)
        state, _, _ = step(state, jax.device_put(emb, batch), jax.device_put(labels, batch))
        ref.update(emb, labels)
    inside = list(ref.items)
    outside = [c for c in range(40) if c not in ref.items]
    labels = np.repeat([inside[0], outside[0], inside[5], outside[1], outside[2], inside[9], outside[3], 7], 2)
    labels = labels.astype(np.int32)
    emb = rng.normal(size=(16, d)).astype(np.float32)

    new_state, grad, metrics = step(state, jax.device_put(emb, batch), jax.device_put(labels, batch))
    loss_of = lambda e, through: reference_loss(e, labels, ref, margin, through, positive)
    want, want_grad = jax.value_and_grad(lambda e: loss_of(e, through))(jnp.asarray(emb))
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(want_grad).max()) > 1e-3
    assert int(metrics["memory_refreshed"]) >= 3 and int(metrics["memory_dequeued"]) >= 1
    assert int(metrics["invalid_labels"]) == 0
    # The other way of differentiating gives another gradient: the option matters.
    other = jax.grad(lambda e: loss_of(e, not through))(jnp.asarray(emb))
    assert float(jnp.abs(other - want_grad).max()) > 1e-3

    ref.update(emb, labels)
    got = _in_memory(head, new_state)
    assert list(got) == list(ref.items)
    for c, proto in ref.items.items():
        np.testing.assert_allclose(got[c], proto, rtol=1e-5, atol=1e-6)


# ---- config, memory ------------------------------------------------------------------


def test_config_requirements_and_their_errors():
    c = recipes.load("synthetic", ["--config.head.name=prototype_memory"])
    assert heads.requirements(c) == heads.Requirements("identity_balanced", 2, False, "online", 0.999)
    validate(c, num_devices=8)
    four = recipes.load(
        "synthetic", ["--config.head.name=prototype_memory", "--config.data.images_per_identity_in_batch=4"]
    )
    assert heads.requirements(four).images_per_identity == 4
    validate(four, num_devices=8)
    bad = {
        "--config.data.sampler=uniform": "head 'prototype_memory' needs 2 images of each identity in every batch",
        "--config.head.prototype_memory.memory_size=16": "must hold at least one step's 64 images",
        "--config.head.prototype_memory.memory_fraction=0": "config.head.prototype_memory.memory_fraction",
        "--config.head.margin.m2=4": "config.head.margin",
        "--config.head.prototype_memory.positive=self": "config.head.prototype_memory.positive",
        "--config.global_batch_size=24": "to be whole identities of 2 images",
    }
    for flag, message in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(recipes.load("synthetic", ["--config.head.name=prototype_memory", flag]), num_devices=8)


def test_compiled_memory_does_not_depend_on_the_number_of_identities():
    """No identity -> slot table: the same program at 10^4 and 10^7 identities."""
    mesh = sharding.make_mesh()
    head = lambda n: PrototypeMemory(mesh, num_classes=n, embedding_dim=32, memory_size=1024)
    sizes = {n: _compiled_memory(head(n), 64, 32) for n in (10**4, 10**7)}
    assert sizes[10**4] == sizes[10**7]
    assert sizes[10**4][1] > 1024 * 32 * 4 // 8  # the memory's block is among the arguments


def test_gradient_accumulation_writes_the_same_identities():
    """Two micro-batches: each identity's two images stay in one micro-batch, the step
    writes every identity of the global batch, the loss is finite."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 16, 16, 3), dtype=np.uint8)
    labels = np.repeat(rng.choice(50, (2, 16), replace=False), 2, axis=1).astype(np.int32)
    memories = {}
    for k in (1, 2):
        c = step_config(head__name="prototype_memory", head__prototype_memory__memory_size=64, grad_accum_steps=k)
        mesh = sharding.make_mesh()
        setup = train.build(c, mesh, num_classes=50, num_examples=1000)
        state = setup.trainer.init(setup.params, setup.batch_stats, jax.random.key(0))
        step, batch = setup.trainer.jit(), sharding.batch_sharding(mesh)
        for b in range(2):
            state, metrics = step(state, jax.device_put(images[b], batch), jax.device_put(labels[b], batch))
            assert np.isfinite(float(metrics["loss"])) and int(metrics["memory_enqueued"]) == 16
        memories[k] = sorted(x for x in jax.device_get(state.head.slots["labels"]).tolist() if x >= 0)
    assert memories[1] == memories[2] == sorted(labels.reshape(-1)[::2].tolist())


# ---- end to end: the real main in subprocesses ------------------------------------------

PM_RUN = [
    "--config.head.name=prototype_memory",
    "--config.head.prototype_memory.memory_size=20",  # 8 identities per step: dequeues from step 3
    "--config.checkpoint_every_steps=6",  # the resumed run starts from 6
]
NO_EMA = ("train", "backbone")


@pytest.fixture(scope="module")
def pm_runs(tmp_path_factory):
    """12 steps straight on 8 devices; stopped at 6 and resumed; continued on 1 device."""
    return straight_resumed_and_moved(tmp_path_factory.mktemp("prototype_memory"), PM_RUN)


def test_prototype_memory_run_resumes_bit_identically(pm_runs):
    straight = assert_resumed_bit_identically(pm_runs, NO_EMA)
    assert not (pm_runs["a"] / "checkpoints" / "12" / "ema").exists()  # no second encoder
    head = straight["train"]["head"]
    assert head["slots"]["views"].shape == (24, 1, 16)  # 20 slots padded for 8 devices
    assert int(head["clock"]) == 12 * 16 and (head["slots"]["labels"][:20] >= 0).all()
    records = [json.loads(line) for line in (pm_runs["a"] / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["step"] == 12 and "loss" in r][0]
    for key in ("accuracy", "memory_fill", "memory_refreshed", "memory_enqueued", "memory_dequeued"):
        assert np.isfinite(last[key]), key
    assert last["memory_fill"] == 1.0 and last["memory_dequeued"] > 0
    evaluated = [r["eval/synthetic/accuracy"] for r in records if "eval/synthetic/accuracy" in r]
    # The trained backbone on held-out identities, above chance (0.5); the demo's rise
    # over a longer run is in the README.
    assert len(evaluated) == 1 and evaluated[0] > 0.6


def test_prototype_memory_run_continues_on_one_device(pm_runs):
    out = pm_runs["out"]["one"]
    assert "resumed from checkpoint step 6" in out.stdout and "on 1 device(s)" in out.stdout
    here, there = items(pm_runs["one"], 12, NO_EMA), items(pm_runs["a"], 12, NO_EMA)
    head, ref = here["train"]["head"], there["train"]["head"]
    assert head["slots"]["views"].shape == (20, 1, 16)
    for field in ("labels", "stamps"):
        np.testing.assert_array_equal(head["slots"][field], ref["slots"][field][:20], err_msg=field)
    np.testing.assert_allclose(head["slots"]["views"], ref["slots"]["views"][:20], atol=1e-3)
