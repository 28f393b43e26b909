"""A head written against the contract plugs in through the registry alone: config
validation, the trainer's step (with gradient accumulation) and checkpoints take it
without knowing it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pfc_jax import checkpoint, heads, sharding, train
from pfc_jax.config_validation import ConfigError, validate
from pfc_jax.inference import normalize_images
from tests import recipes

LR = 0.5


@dataclasses.dataclass(frozen=True)
class DenseSoftmax:
    """Plain softmax over replicated class weights, plain SGD: a minimal Head."""

    mesh: jax.sharding.Mesh
    num_classes: int
    embedding_dim: int

    def init_state(self, key):
        return jax.random.normal(key, (self.num_classes, self.embedding_dim)) * 0.1

    def state_shardings(self):
        return sharding.replicated(self.mesh)

    def prepare(self, state, labels, key):
        invalid = jnp.sum((labels < 0) | (labels >= self.num_classes))
        return state, labels, {"invalid_labels": invalid}

    def micro_loss(self, weights, labels, embeddings, micro):
        k = labels.shape[0] // embeddings.shape[0]
        labels = labels.reshape(k, -1)[micro]
        logits = embeddings.astype(jnp.float32) @ weights.T
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels)}

    def update(self, state, weights, context, grads):
        return state - LR * grads

    def describe(self, global_batch):
        return f"{self.num_classes} dense classes"


def _check(c):
    c.in_range("head.sample_rate", 0.0, 1.0)  # the head's own field checks run too


ENTRY = heads.HeadEntry(
    build=lambda config, mesh, *, num_classes, learning_rate: DenseSoftmax(
        mesh, num_classes, config.model.embedding_dim
    ),
    check=_check,
)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(heads.HEADS, "dense_test", ENTRY)


def _config(**kw):
    c = recipes.load("synthetic")
    c.model.name, c.model.embedding_dim, c.data.image_size = "mlp", 8, 16
    c.global_batch_size, c.total_steps, c.schedule.warmup_epochs = 16, 10, 0.0
    c.head.name = "dense_test"
    for key, value in kw.items():
        c[key] = value
    return c


def test_validation_reads_the_registry(registered):
    validate(_config(), num_devices=8)
    c = _config()
    c.head.sample_rate = 2.0
    with pytest.raises(ConfigError, match="head.sample_rate = 2.0"):
        validate(c, num_devices=8)
    c = _config()
    c.head.name = "nope"
    heads_listed = "partial_fc, dcq, f2c, prototype_memory, dense_test"
    with pytest.raises(ConfigError, match=f"head.name = 'nope': must be one of {heads_listed}"):
        validate(c, num_devices=8)


def test_train_step_equals_a_plain_computation(registered, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, 16).astype(np.int32)
    mesh = sharding.make_mesh()
    batch = sharding.batch_sharding(mesh)
    results = []
    for k in (1, 2):
        setup = train.build(_config(grad_accum_steps=k), mesh, num_classes=5, num_examples=160)
        state = setup.trainer.init(setup.params, setup.batch_stats, jax.random.key(0))
        before = jax.device_get(state)
        new, metrics = setup.trainer.jit()(state, jax.device_put(images, batch), jax.device_put(labels, batch))
        results.append((jax.device_get(new), jax.device_get(metrics)))

    # The plain computation: the MLP's embeddings, softmax cross-entropy, SGD on the weights.
    model = nnx.merge(setup.trainer.graphdef, before.params, before.batch_stats)

    def loss(weights):
        embeddings = model(normalize_images(jnp.asarray(images)), train=True)
        logp = jax.nn.log_softmax(embeddings @ weights.T)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(labels)[:, None], axis=1))

    value, grads = jax.value_and_grad(loss)(before.head)
    for new, metrics in results:
        np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
        np.testing.assert_allclose(new.head, before.head - LR * grads, rtol=1e-5, atol=1e-6)
        assert int(metrics["invalid_labels"]) == 0 and 0.0 <= float(metrics["accuracy"]) <= 1.0

    # Its state checkpoints and restores like any other.
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(jax.device_put(results[0][0], setup.trainer.state_shardings), {}, setup.meta)
    restored, _, meta = ckpt.restore(1, setup.trainer.abstract_state)
    ckpt.close()
    np.testing.assert_array_equal(restored.head, results[0][0].head)
    assert meta["head"] == "dense_test"
