"""ONNX export and the embedding CLI.

onnxruntime equals JAX for every small backbone at two batch sizes; the file has the
deployment signature (NCHW input, symbolic batch, one [N, D] output); bad workdirs fail
clearly; re-exports replace files atomically; `pfc_jax.embed` gives the same embeddings
from the ONNX file and from the workdir.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from flax import nnx
from PIL import Image

from pfc_jax import checkpoint, embed, export, models
from pfc_jax.heads.partial_fc import HeadState
from pfc_jax.step import TrainState
from tests.cli_helpers import exits_with

ROOT = pathlib.Path(__file__).parents[1]
SIZE, DIM = 32, 16
BACKBONES = (
    "iresnet_narrow",
    "mobilefacenet_narrow",
    "vit_narrow",
    "vargfacenet_narrow",
    "shufflemixfacenet_narrow",
    "mlp",
)


def make_workdir(path: pathlib.Path, name: str, step: int = 7, seed: int = 0) -> pathlib.Path:
    """A workdir holding one checkpoint written by the trainer's Checkpointer. BatchNorm
    statistics are random, so inference mode differs from normalizing by the batch."""
    model = models.create(name, embedding_dim=DIM, image_size=SIZE, seed=seed)
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(seed)

    def randomize(keypath, x):
        if str(keypath[-1].key) == "var":
            return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
        return rng.normal(0.0, 0.2, x.shape).astype(np.float32)

    state = TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=nnx.to_pure_dict(params),
        batch_stats=jax.tree_util.tree_map_with_path(randomize, nnx.to_pure_dict(stats)),
        opt_state=(),
        head=HeadState(np.zeros((8, DIM), np.float32), ()),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    meta = {
        "model": {"name": name, "embedding_dim": DIM, "image_size": SIZE, "dropout": 0.0},
        "num_classes": 8,
        "num_devices": 1,
    }
    ckpt = checkpoint.Checkpointer(path / "checkpoints", async_save=False)
    ckpt.save(state, {}, meta)
    ckpt.close()
    return path


def jax_embeddings(workdir, x_nhwc):
    model, _, _, _ = checkpoint.load_backbone(workdir)
    with jax.default_matmul_precision("highest"):
        return np.asarray(model(jnp.asarray(x_nhwc), train=False))


def random_batch(n, seed):
    images = np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    return (images.astype(np.float32) - 127.5) / 127.5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """backbone -> (workdir, model.onnx, ExportReport), each exported once."""
    base = tmp_path_factory.mktemp("export")
    out = {}
    for seed, name in enumerate(BACKBONES):
        workdir = make_workdir(base / name, name, seed=seed)
        path = base / f"{name}.onnx"
        out[name] = (workdir, path, export.export(workdir, path))
    return out


@pytest.mark.parametrize("name", BACKBONES)
def test_onnxruntime_equals_jax(exported, name):
    workdir, path, report = exported[name]
    assert report.max_abs_diff <= 1e-4 and report.batch_sizes == (1, 3)
    assert (report.backbone, report.step, report.opset) == (name, 7, export.DEFAULT_OPSET)
    assert report.num_bytes == path.stat().st_size and report.data_path is None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (2, 5):
        x = random_batch(n, seed=n)
        got = session.run(["embedding"], {"input": x.transpose(0, 3, 1, 2)})[0]
        want = jax_embeddings(workdir, x)
        assert got.shape == (n, DIM)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert np.abs(want).max() > 0.1  # not a degenerate all-zero model


def test_graph_has_the_deployment_signature(exported):
    for name, (_, path, _) in exported.items():
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        (inp,), (out,) = model.graph.input, model.graph.output
        dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        assert inp.name == "input" and out.name == "embedding", name
        assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert dims(inp) == ["N", 3, SIZE, SIZE] and dims(out) == ["N", DIM], name
        assert [o.version for o in model.opset_import] == [export.DEFAULT_OPSET]
        props = {p.key: p.value for p in model.metadata_props}
        assert props["backbone"] == name and props["input_normalization"] == "(x - 127.5) / 127.5"
    # Convolution backbones run in NCHW without a transpose per layer; PReLU stays PReLU.
    ops = [n.op_type for n in onnx.load(str(exported["iresnet_narrow"][1])).graph.node]
    assert ops.count("Transpose") == 0 and ops.count("PRelu") == 5 and ops.count("Conv") == 13


def test_cli_exports_a_chosen_step_and_prints_a_summary(exported, tmp_path, capsys):
    workdir = exported["mlp"][0]
    export.main(["--workdir", str(workdir), "--step", "7", "--output", str(tmp_path / "m.onnx"), "--opset", "13"])
    text = capsys.readouterr().out
    assert "exported mlp (step 7)" in text and "opset 13" in text and "max abs diff" in text
    assert "'input' float32 [N, 3, 32, 32]" in text and "'embedding' float32 [N, 16]" in text
    assert onnx.load(str(tmp_path / "m.onnx")).opset_import[0].version == 13


def test_missing_or_incomplete_workdir_fails_clearly(exported, tmp_path, capsys):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pfc_jax.export",
            "--workdir",
            str(tmp_path / "nowhere"),
            "--output",
            str(tmp_path / "m.onnx"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert out.returncode == 2 and "no checkpoints/ directory" in out.stderr and "Traceback" not in out.stderr
    incomplete = tmp_path / "incomplete"
    (incomplete / "checkpoints" / "5.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
    with exits_with(capsys, "no complete checkpoint"):
        export.main(["--workdir", str(incomplete), "--output", str(tmp_path / "m.onnx")])
    damaged = shutil.copytree(exported["mlp"][0], tmp_path / "damaged")
    shutil.rmtree(damaged / "checkpoints" / "7" / "backbone")
    with exits_with(capsys, r"cannot read the backbone of checkpoint step 7 in .*damaged.*backbone"):
        export.main(["--workdir", str(damaged), "--output", str(tmp_path / "m.onnx")])
    with exits_with(capsys, r"no checkpoint for step 3 .* available: \[7\]"):
        export.main(["--workdir", str(exported["mlp"][0]), "--step", "3", "--output", str(tmp_path / "m.onnx")])
    assert not (tmp_path / "m.onnx").exists()


def test_reexport_replaces_the_file_and_its_external_data(exported, tmp_path):
    workdir = exported["mlp"][0]
    path, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    export.export(workdir, path, opset=13)
    export.export(workdir, path, opset=17)
    assert onnx.load(str(path)).opset_import[0].version == 17 and not data.exists()
    # As for a model over 2 GB: the weights in m.onnx.data. A second export replaces
    # that file instead of appending to it.
    sizes = []
    for _ in range(2):
        report = export.export(workdir, path, external_data_threshold=0)
        assert report.data_path == data and data.exists()
        sizes.append((path.stat().st_size, data.stat().st_size))
    assert sizes[0] == sizes[1] and sizes[0][1] > 3072 * 64 * 4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = random_batch(2, seed=0)
    np.testing.assert_allclose(
        session.run(None, {"input": x.transpose(0, 3, 1, 2)})[0], jax_embeddings(workdir, x), atol=1e-4, rtol=0
    )
    export.export(workdir, path)  # back to one self-contained file
    assert not data.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_failed_check_writes_nothing(exported, tmp_path):
    with pytest.raises(export.ExportError, match="was not written"):
        export.export(exported["mlp"][0], tmp_path / "m.onnx", atol=-1.0, rtol=0.0)
    assert list(tmp_path.iterdir()) == []


class Toy(nnx.Module):
    """Operations of vision transformers and other vision layers, beyond the zoo's."""

    def __init__(self, rngs):
        self.proj = nnx.Linear(3, 8, rngs=rngs)
        self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, 8)))
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.out = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x, *, train):
        n = x.shape[0]
        pooled = x.mean(axis=(1, 2))
        h = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))[:, ::2, 1:-1]  # static indexing: gathers
        t = self.proj(h.reshape(n, -1, 3))
        t = jnp.concatenate([jnp.broadcast_to(self.cls[...], (n, 1, 8)), t], axis=1)
        attention = jax.nn.softmax(jnp.einsum("ntd,nsd->nts", t, t) / jnp.sqrt(8.0))
        t = self.norm(jnp.einsum("nts,nsd->ntd", attention, t))
        y = jax.nn.gelu(t.max(axis=1)) + jax.nn.gelu(t[:, 0], approximate=False)
        y = jnp.clip(y, -2.0, 2.0) ** 3 + jnp.tanh(y) * jax.nn.sigmoid(y)
        return self.out(y) + jnp.flip(pooled, axis=1).sum(-1, keepdims=True) + jnp.argmax(y, -1)[:, None]


@pytest.mark.parametrize("opset", [13, 18])
def test_translation_of_operations_beyond_the_zoo(opset):
    model = Toy(nnx.Rngs(0))
    proto = export.to_onnx(model, image_size=8, opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (1, 4):
        x = np.random.default_rng(n).uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)
        got = session.run(["embedding"], {"input": x.transpose(0, 3, 1, 2)})[0]
        np.testing.assert_allclose(got, np.asarray(model(x, train=False)), atol=1e-5, rtol=0)


def test_untranslatable_operation_is_named():
    class Sorted(nnx.Module):
        def __call__(self, x, *, train):
            return jnp.sort(x.reshape(x.shape[0], -1), axis=-1)[:, :4]

    with pytest.raises(export.ExportError, match="JAX operation 'sort' .* has no ONNX translation"):
        export.to_onnx(Sorted(), image_size=4)


def write_faces(folder: pathlib.Path, n: int, size: int = SIZE) -> list[pathlib.Path]:
    rng, paths = np.random.default_rng(1), []
    for i in range(n):
        path = folder / f"id{i % 2}" / f"{i}.{'jpg' if i % 3 == 0 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return sorted(paths)


def test_embed_cli_onnx_equals_workdir(exported, tmp_path, capsys):
    workdir, onnx_path, _ = exported["iresnet_narrow"]
    paths = write_faces(tmp_path / "faces", 5)
    common = ["--images", str(tmp_path / "faces"), "--batch-size", "2", "--flip"]
    embed.main(["--onnx", str(onnx_path), *common, "--out", str(tmp_path / "a.npy")])
    embed.main(["--workdir", str(workdir), *common, "--out", str(tmp_path / "b.npy")])
    captured = capsys.readouterr()
    assert "wrote 5 x 16 embeddings" in captured.out and "images: 5/5" in captured.err
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (5, DIM) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert (tmp_path / "a.paths.txt").read_text().splitlines() == [str(p) for p in paths]
    # A list file: its order, paths relative to the list's folder.
    (tmp_path / "list.txt").write_text("".join(f"{p.relative_to(tmp_path)}\n" for p in reversed(paths)))
    embed.main(
        ["--onnx", str(onnx_path), "--images", str(tmp_path / "list.txt"), "--out", str(tmp_path / "c.npy"), "--flip"]
    )
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), a[::-1], atol=1e-5, rtol=0)
    capsys.readouterr()

    out = subprocess.run(
        [sys.executable, "-m", "pfc_jax.embed", "compare", str(paths[0]), str(paths[1]), "--onnx", str(onnx_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cos = float(out.stdout)
    assert -1.0 <= cos <= 1.0
    embed.main(["compare", str(paths[0]), str(paths[1]), "--workdir", str(workdir)])
    assert float(capsys.readouterr().out) == pytest.approx(cos, abs=1e-5)


def test_embed_errors_name_the_file(exported, tmp_path, capsys):
    onnx_path = str(exported["mlp"][1])
    run = lambda images: embed.main(["--onnx", onnx_path, "--images", str(images), "--out", str(tmp_path / "f.npy")])
    faces = tmp_path / "faces"
    paths = write_faces(faces, 2)
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(faces / "big.png")
    with exits_with(capsys, r"big.png is 30x40; the model takes aligned 32x32 faces"):
        run(faces)
    (faces / "big.png").unlink()
    (faces / "broken.jpg").write_bytes(b"not a jpeg")
    with exits_with(capsys, r"cannot decode .*broken.jpg"):
        run(faces)
    (tmp_path / "list.txt").write_text(f"{paths[0]}\nfaces/gone.png\n")
    with exits_with(capsys, r"list.txt lists 1 missing file\(s\), the first: .*faces/gone.png"):
        run(tmp_path / "list.txt")
    (tmp_path / "empty").mkdir()
    with exits_with(capsys, "no .jpg, .jpeg, .png images under"):
        run(tmp_path / "empty")
    with exits_with(capsys, "no such folder or list file"):
        run(tmp_path / "nowhere")
    with exits_with(capsys, "missing.onnx: no such ONNX file"):
        embed.main(["--onnx", str(tmp_path / "missing.onnx"), "--images", str(faces), "--out", str(tmp_path / "f.npy")])
    with exits_with(capsys, "gone.jpg: no such file"):
        embed.main(["compare", str(paths[0]), str(tmp_path / "gone.jpg"), "--onnx", onnx_path])
    assert not (tmp_path / "f.npy").exists()
