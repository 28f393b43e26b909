"""DCQ and the machinery of generated class weights: the sharded ring queue, the EMA
encoder in the train state, the config's requirements, resume and inference tools."""

import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pfc_jax import checkpoint, heads, sharding, train
from pfc_jax.config_validation import ConfigError, validate
from pfc_jax.heads.dcq import DCQ
from pfc_jax.heads.queue import QueueState, RingQueue
from tests import recipes
from tests.test_step import config as step_config
from tests.test_train import finish, run_main, start_main

ROOT = pathlib.Path(__file__).parents[1]


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _queue_state(queue: RingQueue, weights, labels, ptr) -> QueueState:
    """A queue holding ``weights`` / ``labels`` (numpy, ``queue.size`` rows) at ``ptr``."""
    pad = queue.size_padded - queue.size
    slots = {
        "weights": np.concatenate([weights, np.zeros((pad, queue.dim))]).astype(np.float32),
        "labels": np.concatenate([labels, np.full(pad, -1)]).astype(np.int32),
    }
    placed = jax.device_put(slots, queue.shardings().slots)
    return QueueState(placed, jax.device_put(np.int32(ptr), queue.shardings().ptr))


def reference_loss(embeddings, keys, labels, weights, slot_labels, *, g, s, m):
    """DCQ written plainly: one [B, 1 + K] logit matrix, log-softmax, positive column 0."""
    q = embeddings / jnp.linalg.norm(embeddings, axis=1, keepdims=True)
    k = keys / jnp.linalg.norm(keys, axis=1, keepdims=True)
    b = q.shape[0]
    rows = []
    for i in range(b):  # leave-one-out mean of the other keys of i's group
        start = (i // g) * g
        others = [k[j] for j in range(start, start + g) if j != i]
        mean = sum(others) / len(others)
        rows.append(mean / jnp.linalg.norm(mean))
    positive = jnp.stack(rows)
    w = weights / np.maximum(np.linalg.norm(weights, axis=1, keepdims=True), 1e-12)
    allowed = (slot_labels[None, :] >= 0) & (slot_labels[None, :] != labels[:, None])
    logits = jnp.concatenate(
        [s * (jnp.sum(q * positive, axis=1, keepdims=True) - m), jnp.where(allowed, s * q @ w.T, -jnp.inf)], axis=1
    )
    return -jnp.mean(jax.nn.log_softmax(logits, axis=1)[:, 0])


@pytest.mark.parametrize("g", [2, 3])
def test_loss_and_gradient_match_a_plain_reference(g):
    """Sharded over 8 devices, 13 slots (3 of them padding on 8 devices), empty slots and
    slots of the batch's own identities: loss, gradient, metrics and the enqueue."""
    mesh = sharding.make_mesh()
    b, d, k = 24, 8, 13
    head = DCQ(mesh, num_classes=100, embedding_dim=d, queue_size=k, images_per_identity=g, scale=20.0, margin=0.3)
    rng = np.random.default_rng(g)
    labels = np.repeat(rng.choice(100, b // g, replace=False), g).astype(np.int32)
    slot_labels = rng.integers(0, 100, k)
    slot_labels[[1, 5]] = -1  # never written
    slot_labels[[2, 7, 8]] = labels[[0, 0, g]]  # the batch's own identities: masked per query
    weights = _normalize(rng.normal(size=(k, d)))
    state = _queue_state(head.queue, weights, slot_labels, ptr=9)
    emb = rng.normal(size=(b, d)).astype(np.float32)
    keys = rng.normal(size=(b, d)).astype(np.float32)
    batch = sharding.batch_sharding(mesh)
    emb_, keys_, labels_ = (jax.device_put(x, batch) for x in (emb, keys, labels))

    step = jax.jit(lambda st, e, lab, ks: heads.step(head, st, e, lab, jax.random.key(0), ks))
    new_state, grad, metrics = step(state, emb_, labels_, keys_)

    ref = lambda e: reference_loss(e, keys, labels, weights, slot_labels, g=g, s=20.0, m=0.3)
    ref_loss, ref_grad = jax.value_and_grad(ref)(jnp.asarray(emb))
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(ref_grad).max()) > 1e-3  # a gradient that can fail

    # Metrics: the queue's fill, the masked columns, the positive's rank.
    assert float(metrics["queue_fill"]) == pytest.approx(11 / 13)
    allowed = (slot_labels[None, :] >= 0) & (slot_labels[None, :] != labels[:, None])
    assert float(metrics["masked_columns"]) == pytest.approx(1 - allowed.sum(1).mean() / k)
    assert int(metrics["mixed_groups"]) == 0 and int(metrics["invalid_labels"]) == 0

    # Enqueued: one normalized mean key per identity, at ptr 9, 10, 11, 12, 0, 1, ...
    n = b // g
    means = _normalize(_normalize(keys).reshape(n, g, d).sum(1))
    expect_w, expect_l = weights.copy(), slot_labels.copy()
    for j in range(n):
        expect_w[(9 + j) % k], expect_l[(9 + j) % k] = means[j], labels[j * g]
    got = jax.device_get(new_state)
    np.testing.assert_allclose(got.slots["weights"][:k], expect_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.slots["labels"][:k], expect_l)
    assert int(got.ptr) == (9 + n) % k

    # The keys get no gradient: they are the key encoder's, which is not trained.
    def loss_of_keys(ks):
        params, context, _ = head.prepare(state, labels_, jax.random.key(0), keys=ks)
        return head.micro_loss(params, context, emb_, 0)[0]

    assert not np.asarray(jax.jit(jax.grad(loss_of_keys))(keys_)).any()


def test_groups_that_are_not_one_identity_are_counted():
    mesh = sharding.make_mesh()
    head = DCQ(mesh, num_classes=10, embedding_dim=4, queue_size=8)
    labels = jnp.asarray([0, 0, 1, 2, 3, 3, 4, 5], jnp.int32)  # groups (1, 2) and (4, 5) mixed
    _, _, metrics = head.prepare(head.queue.init(), labels, jax.random.key(0), keys=jnp.ones((8, 4)))
    assert int(metrics["mixed_groups"]) == 2


def python_ring(size, batches):
    slots, ptr = [(None, -1)] * size, 0
    for entries in batches:
        for entry in entries:
            slots[ptr] = entry
            ptr = (ptr + 1) % size
    return slots, ptr


def test_queue_matches_a_python_ring_buffer_on_1_and_8_devices():
    """Wrap-around, batches that do not divide the size, a batch as large as the queue,
    duplicate labels; the same queue whatever the device count."""
    size, dim = 10, 3
    rng = np.random.default_rng(0)
    sizes = (4, 4, 3, 7, 10, 1)
    batches = [
        [(rng.normal(size=dim).astype(np.float32), int(label)) for label in rng.integers(0, 4, n)] for n in sizes
    ]
    expect, expect_ptr = python_ring(size, batches)
    for devices in (1, 8):
        queue = RingQueue(sharding.make_mesh(jax.devices()[:devices]), size, dim)
        state = jax.jit(queue.init, out_shardings=queue.shardings())()
        assert state.slots["weights"].shape == ((16 if devices == 8 else 10), dim)
        enqueue = jax.jit(queue.enqueue)
        for entries in batches:
            w = np.stack([e[0] for e in entries])
            labels = np.asarray([e[1] for e in entries], np.int32)
            state = enqueue(state, {"weights": w, "labels": labels})
        got = jax.device_get(state)
        assert int(got.ptr) == expect_ptr
        np.testing.assert_array_equal(got.slots["labels"][:size], [label for _, label in expect])
        np.testing.assert_array_equal(got.slots["weights"][:size], np.stack([w for w, _ in expect]))
        assert (got.slots["labels"][size:] == -1).all()  # padding never written
    latest = queue.latest_per_label(state, 5)
    newest = {}
    for w, label in (e for entries in batches for e in entries):
        newest[label] = w
    for label in range(5):
        if label in newest:
            np.testing.assert_array_equal(latest[label], newest[label])
        else:
            assert np.isnan(latest[label]).all()
    with pytest.raises(ValueError, match="1 to size"):
        queue.enqueue(state, {"weights": np.zeros((11, dim)), "labels": np.zeros(11, np.int32)})


def _paired_batches(c, steps, num_classes=50):
    rng = np.random.default_rng(1)
    b, s = c.global_batch_size, c.data.image_size
    for _ in range(steps):
        labels = np.repeat(rng.choice(num_classes, b // 2, replace=False), 2).astype(np.int32)
        yield rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), labels


def _train_dcq(devices: int, steps: int, **overrides):
    """``steps`` DCQ steps of the mlp on paired batches: (losses, final state, last metrics)."""
    c = step_config(head__name="dcq", head__dcq__queue_size=80, ema__momentum=0.9, head__dcq__scale=10.0, **overrides)
    mesh = sharding.make_mesh(jax.devices()[:devices])
    setup = train.build(c, mesh, num_classes=50, num_examples=1000)
    state = setup.trainer.init(setup.params, setup.batch_stats, jax.random.key(0))
    step, batch = setup.trainer.jit(), sharding.batch_sharding(mesh)
    losses = []
    for images, labels in _paired_batches(c, steps):
        state, metrics = step(state, jax.device_put(images, batch), jax.device_put(labels, batch))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state), metrics


def test_trainer_on_1_and_8_devices_gives_the_same_run():
    """The whole DCQ step (EMA keys, loss, backbone and EMA updates, enqueue) on 1 and 8
    devices: the same losses, parameters, EMA and queue."""
    runs = {devices: _train_dcq(devices, 4) for devices in (1, 8)}
    (l1, s1, m1), (l8, s8, m8) = runs[1], runs[8]
    assert float(m1["queue_fill"]) == float(m8["queue_fill"])
    assert abs(l1[0]) < 1e-6 and l1[1] > 1  # the queue is empty at the first step: loss 0
    np.testing.assert_allclose(l1, l8, rtol=2e-5)
    for a, b in zip(jax.tree.leaves((s1.params, s1.ema)), jax.tree.leaves((s8.params, s8.ema)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s1.head.slots["labels"], s8.head.slots["labels"])
    np.testing.assert_allclose(s1.head.slots["weights"], s8.head.slots["weights"], atol=1e-5)
    assert int(s1.head.ptr) == int(s8.head.ptr) == 4 * 16
    assert float(m8["queue_fill"]) == pytest.approx(48 / 80)  # before the 4th step's 16 entries
    assert 0 < float(m8["ema_distance"]) < 1


def test_gradient_accumulation_gives_the_same_dcq_step():
    """Two micro-batches (keys embedded per micro-batch, the positives sliced from the
    step's context) give the loss and update of one: the queue is fixed within a step."""
    (l1, s1, _), (l2, s2, _) = (_train_dcq(8, 3, grad_accum_steps=k) for k in (1, 2))
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves((s1.params, s1.ema)), jax.tree.leaves((s2.params, s2.ema)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The same entries, enqueued in micro-batch-major order.
    assert sorted(s1.head.slots["labels"].tolist()) == sorted(s2.head.slots["labels"].tolist())


def _compiled_memory(head, batch, dim):
    mesh = head.mesh
    shard = sharding.batch_sharding(mesh)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(head.init_state, jax.random.key(0)),
        head.state_shardings(),
    )
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=shard)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=shard)
    keys = emb if getattr(head, "key_encoder", None) else None
    step = lambda state, e, lab, k: heads.step(head, state, e, lab, jax.random.key(0), k)
    memory = jax.jit(step, donate_argnums=0).lower(abstract, emb, labels, keys).compile().memory_analysis()
    return memory.temp_size_in_bytes, memory.argument_size_in_bytes


def test_compiled_memory_does_not_depend_on_the_number_of_identities():
    mesh = sharding.make_mesh()
    sizes = {
        n: _compiled_memory(DCQ(mesh, num_classes=n, embedding_dim=32, queue_size=1024), 64, 32) for n in (10**4, 10**7)
    }
    assert sizes[10**4] == sizes[10**7]
    assert sizes[10**4][1] > 1024 * 32 * 4 // 8  # the queue's block is among the arguments


def test_config_requirements_and_their_errors():
    c = recipes.load("synthetic", ["--config.head.name=dcq"])
    need = heads.requirements(c)
    assert need == heads.Requirements("identity_balanced", 2, True, "ema", 0.999)
    validate(c, num_devices=8)
    pfc = heads.requirements(recipes.load("synthetic"))
    assert pfc == heads.Requirements("uniform", 4, False, "online", 0.999)
    bad = {
        "--config.data.sampler=uniform": "config.data.sampler = 'uniform': head 'dcq' needs 2 images",
        "--config.data.images_per_identity_in_batch=1": "needs >= 2 images per identity",
        "--config.ema.enabled=off": "config.ema.enabled = 'off': head 'dcq' needs the EMA",
        "--config.head.dcq.queue_size=16": "must hold at least one step's 32 entries",
        "--config.head.dcq.scale=0": "config.head.dcq.scale",
        "--config.global_batch_size=24": "to be whole identities of 2 images",
    }
    for flag, message in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(recipes.load("synthetic", ["--config.head.name=dcq", flag]), num_devices=8)
    with pytest.raises(ConfigError, match="eval.encoder = ema needs an EMA"):
        validate(recipes.load("synthetic", ["--config.eval.encoder=ema", "--config.ema.enabled=off"]), num_devices=8)
    with_ema = heads.requirements(recipes.load("synthetic", ["--config.eval.encoder=ema"]))
    assert with_ema.ema and with_ema.eval_encoder == "ema"  # any head can evaluate an EMA


# ---- end to end: the real main in subprocesses ------------------------------------------

DCQ_RUN = [
    "--config.head.name=dcq",
    "--config.head.dcq.queue_size=20",  # 8 entries per step: wraps around at step 3
    "--config.ema.momentum=0.9",
    "--config.checkpoint_every_steps=1",
]


def items(workdir, step, names=("train", "backbone", "ema")):
    path = pathlib.Path(workdir) / "checkpoints" / str(step)
    out = {}
    for item in names:
        out[item] = jax.tree.map(np.asarray, ocp.PyTreeCheckpointer().restore(path / item))
    return out


def straight_resumed_and_moved(base, flags):
    """A: 12 steps straight on 8 devices, evaluated at the end on the held-out synthetic
    identities. B: stopped at 6, resumed by a new process. One: a copy of B at 6 continues
    on 1 device. Returns the workdirs and the processes' outputs."""
    a, b, one = base / "a", base / "b", base / "one"
    straight = start_main(a, *flags, "--config.eval.bins=synthetic")  # beside the others
    out = {"b1": run_main(b, *flags, "--config.stop_at_step=6")}
    shutil.copytree(b, one)
    resumed, moved = start_main(b, *flags), start_main(one, *flags, devices=1)
    out.update(a=finish(straight), b2=finish(resumed), one=finish(moved))
    for name, o in out.items():
        assert o.returncode == 0, (name, o.stderr[-3000:])
    return dict(a=a, b=b, one=one, out=out)


def assert_resumed_bit_identically(runs, names=("train", "backbone", "ema")):
    """B's step 12, resumed from 6, is A's step 12 bit for bit (checkpoint items
    ``names``); returns A's checkpoint."""
    assert "resumed from checkpoint step 6" in runs["out"]["b2"].stdout
    straight, resumed = items(runs["a"], 12, names), items(runs["b"], 12, names)
    flat_a = jax.tree_util.tree_leaves_with_path(straight)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(resumed))
    assert len(flat_a) == len(flat_b)
    for path, leaf in flat_a:
        np.testing.assert_array_equal(leaf, flat_b[path], err_msg=jax.tree_util.keystr(path))
    return straight


@pytest.fixture(scope="module")
def dcq_runs(tmp_path_factory):
    return straight_resumed_and_moved(tmp_path_factory.mktemp("dcq"), DCQ_RUN)


def test_dcq_run_resumes_bit_identically(dcq_runs):
    straight = assert_resumed_bit_identically(dcq_runs)
    head = straight["train"]["head"]
    assert head["slots"]["weights"].shape == (24, 16)  # 20 slots padded for 8 devices
    assert int(head["ptr"]) == 12 * 8 % 20 and (head["slots"]["labels"][:20] >= 0).all()
    records = [json.loads(line) for line in (dcq_runs["a"] / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["step"] == 12 and "loss" in r][0]
    for key in ("accuracy", "queue_fill", "masked_columns", "ema_distance", "mixed_groups"):
        assert np.isfinite(last[key]), key
    assert last["queue_fill"] == 1.0 and last["mixed_groups"] == 0
    (evaluated,) = [r for r in records if "eval/synthetic/accuracy" in r]
    assert evaluated["step"] == 12 and evaluated["eval/synthetic/accuracy"] > 0.6  # above chance (0.5)


def test_ema_follows_its_formula_in_saved_checkpoints(dcq_runs):
    """ema(t) = m * ema(t - 1) + (1 - m) * online(t), parameters and BatchNorm statistics."""
    before, after = items(dcq_runs["a"], 11), items(dcq_runs["a"], 12)
    expect = jax.tree.map(lambda e, x: 0.9 * e + 0.1 * x, before["ema"], after["backbone"])
    leaves = jax.tree_util.tree_leaves_with_path(after["ema"])
    assert any("batch_stats" in jax.tree_util.keystr(p) for p, _ in leaves)
    for (path, got), want in zip(leaves, jax.tree.leaves(expect), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    gap = [np.abs(e - o).max() for e, o in zip(jax.tree.leaves(after["ema"]), jax.tree.leaves(after["backbone"]))]
    assert max(gap) > 1e-4  # the EMA is not the online encoder


def test_dcq_run_continues_on_one_device(dcq_runs):
    out = dcq_runs["out"]["one"]
    assert "resumed from checkpoint step 6" in out.stdout and "on 1 device(s)" in out.stdout
    here, there = items(dcq_runs["one"], 12), items(dcq_runs["a"], 12)
    head, ref = here["train"]["head"], there["train"]["head"]
    assert head["slots"]["weights"].shape == (20, 16)
    np.testing.assert_array_equal(head["slots"]["labels"], ref["slots"]["labels"][:20])
    assert int(head["ptr"]) == int(ref["ptr"])
    np.testing.assert_allclose(head["slots"]["weights"], ref["slots"]["weights"][:20], atol=1e-3)


def test_inference_tools_read_the_ema_encoder_of_a_dcq_run(dcq_runs):
    workdir = dcq_runs["a"]
    saved = items(workdir, 12)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.float32) / 127.5 - 1
    default, _, step, which = checkpoint.load_backbone(workdir)
    ema, _, _, _ = checkpoint.load_backbone(workdir, encoder="ema")
    online, _, _, _ = checkpoint.load_backbone(workdir, encoder="online")
    assert step == 12 and which == "ema"
    np.testing.assert_array_equal(default(x, train=False), ema(x, train=False))
    assert not np.allclose(ema(x, train=False), online(x, train=False))
    from flax import nnx

    _, params, _ = nnx.split(ema, nnx.Param, nnx.BatchStat)
    first = jax.tree.leaves(nnx.to_pure_dict(params))[0]
    np.testing.assert_array_equal(first, jax.tree.leaves(saved["ema"]["params"])[0])


def test_export_of_a_dcq_run_is_its_ema_encoder(dcq_runs, tmp_path):
    import onnx

    from pfc_jax import export

    report = export.export(dcq_runs["a"], tmp_path / "dcq.onnx")
    props = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
    assert props["encoder"] == "ema" and props["step"] == "12"
    report = export.export(dcq_runs["a"], tmp_path / "online.onnx", encoder="online")
    assert {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}["encoder"] == "online"


def test_a_run_without_ema_refuses_the_ema_encoder(tmp_path):
    out = run_main(tmp_path, "--config.total_steps=2", "--config.schedule.warmup_epochs=0", devices=1)
    assert out.returncode == 0, out.stderr[-2000:]
    with pytest.raises(checkpoint.CheckpointError, match="has no EMA encoder"):
        checkpoint.load_backbone(tmp_path, encoder="ema")
    # A DCQ config cannot resume a run kept without EMA: the checkpoint does not fit.
    out = run_main(tmp_path, *DCQ_RUN, "--config.total_steps=3", "--config.schedule.warmup_epochs=0", devices=1)
    assert out.returncode == 2
    assert "does not fit" in out.stderr or "was written with head 'partial_fc'" in out.stderr
