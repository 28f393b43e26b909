"""End to end: the real `python -m pfc_jax.main` on tiny synthetic runs in subprocesses.

Exact resume across a real process restart, resume on another device count, SIGTERM,
divergence, bad configs, and the backbone-only export.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pfc_jax import checkpoint
from tests import recipes

ROOT = pathlib.Path(__file__).parents[1]
# 37 identities (padded to 40 on 8 or 4 devices, 37 on 1) x 4 images / batch 16 = 9 steps
# per epoch: 12 steps cross an epoch boundary.
TINY = [
    "--config.model.name=iresnet_narrow",
    "--config.model.embedding_dim=16",
    "--config.data.image_size=32",
    "--config.global_batch_size=16",
    "--config.data.synthetic.num_identities=37",
    "--config.data.synthetic.images_per_identity=4",
    "--config.total_steps=12",
    "--config.log_every_steps=2",
    "--config.checkpoint_every_steps=4",
    "--config.eval.bins=",  # evaluation during training: tests/test_evaluation.py
]


def main_cmd(workdir, *overrides):
    return [
        sys.executable,
        "-m",
        "pfc_jax.main",
        "--config",
        str(ROOT / "configs" / "synthetic.py"),
        "--workdir",
        str(workdir),
        *TINY,
        *overrides,
    ]


def env(devices):
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return e


def run_main(workdir, *overrides, devices=8):
    out = subprocess.run(
        main_cmd(workdir, *overrides), capture_output=True, text=True, timeout=600, env=env(devices), cwd=ROOT
    )
    return out


def start_main(workdir, *overrides, devices=8) -> subprocess.Popen:
    """:func:`run_main` without waiting (2 cores: runs that overlap share their start-up
    and compile phases); :func:`finish` collects it."""
    return subprocess.Popen(
        main_cmd(workdir, *overrides),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(devices),
        cwd=ROOT,
    )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def train_tree(workdir, step):
    """The saved `train` and `backbone` items of a checkpoint, as numpy."""
    path = pathlib.Path(workdir) / "checkpoints" / str(step)
    out = {}
    for item in ("train", "backbone"):
        tree = ocp.PyTreeCheckpointer().restore(path / item)
        out[item] = jax.tree.map(np.asarray, tree)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: 12 steps straight. B: stop at 6, then a new process resumes to 12.
    Copies of B at step 6 are kept for the device-count tests."""
    base = tmp_path_factory.mktemp("runs")
    a, b = base / "a", base / "b"
    straight = start_main(a)  # beside B
    out_b1 = run_main(b, "--config.stop_at_step=6")
    copies = {n: base / f"b{n}" for n in (4, 1)}
    for path in copies.values():
        shutil.copytree(b, path)
    out_b2 = run_main(b)
    out_a = finish(straight)
    return dict(a=a, b=b, out_a=out_a, out_b1=out_b1, out_b2=out_b2, copies=copies)


def test_main_writes_what_the_readme_promises(runs):
    out, workdir = runs["out_a"], runs["a"]
    assert out.returncode == 0, out.stderr[-3000:]
    assert "initialized a new run" in out.stdout and "done: step 12" in out.stdout
    assert "[12/12]" in out.stdout and "img/s" in out.stdout and "ETA" in out.stdout
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["name"] == "iresnet_narrow" and config["total_steps"] == 12
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4, 6, 8, 10, 12]  # the first step, then every 2
    for key in ("loss", "lr", "samples_per_sec", "accuracy", "grad_norm"):
        assert all(np.isfinite(r[key]) for r in records), key
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"train/loss" in events[0].read_bytes()
    # keep_checkpoints=3 of the saves at 4, 8, 12.
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4, 8, 12]


def test_resume_after_restart_is_bit_identical(runs):
    assert runs["out_b1"].returncode == 0, runs["out_b1"].stderr[-3000:]
    assert "steps 0 -> 6 of 12" in runs["out_b1"].stdout
    assert runs["out_b2"].returncode == 0, runs["out_b2"].stderr[-3000:]
    assert "resumed from checkpoint step 6" in runs["out_b2"].stdout
    straight, resumed = train_tree(runs["a"], 12), train_tree(runs["b"], 12)
    flat_a = jax.tree_util.tree_leaves_with_path(straight)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(resumed))
    assert len(flat_a) == len(flat_b) > 50
    for path, leaf in flat_a:
        np.testing.assert_array_equal(leaf, flat_b[path], err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("devices", [4, 1])
def test_continue_on_another_device_count(runs, devices):
    workdir = runs["copies"][devices]
    out = run_main(workdir, devices=devices)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from checkpoint step 6" in out.stdout
    assert f"37 classes on {devices} device(s)" in out.stdout
    saved = train_tree(workdir, 12)
    assert saved["train"]["head"]["centers"].shape[0] == {4: 40, 1: 37}[devices]
    meta = json.loads((workdir / "checkpoints" / "12" / "meta" / "metadata").read_text())
    assert meta["num_devices"] == devices


def test_restore_reshards_centers_in_process(runs):
    """The 8-device checkpoint at step 6, restored on 8, 4 and 1 devices: same values."""
    from pfc_jax import sharding, train

    config = recipes.load("synthetic", TINY)
    ckpt = checkpoint.Checkpointer(runs["copies"][1] / "checkpoints")  # still holds step 6 @ 8 devices
    restored = {}
    for n in (8, 4, 1):
        mesh = sharding.make_mesh(jax.devices()[:n])
        setup = train.build(config, mesh, num_classes=37, num_examples=148)
        abstract = setup.trainer.abstract_state
        state, data, meta = ckpt.restore(6, abstract)
        assert state.head.centers.shape[0] == setup.trainer.head.num_classes_padded
        assert len(state.head.centers.sharding.device_set) == n
        assert meta["num_devices"] == 8 and data["batches"] == 6
        restored[n] = jax.tree.map(np.asarray, state)
    for n in (4, 1):
        np.testing.assert_array_equal(restored[n].head.centers[:37], restored[8].head.centers[:37])
        momentum = lambda s: s.head.opt_state[1][0].trace[:37]  # SGD: (decay, (trace,...))
        np.testing.assert_array_equal(momentum(restored[n]), momentum(restored[8]))
        for a, b in zip(jax.tree.leaves(restored[n].params), jax.tree.leaves(restored[8].params)):
            np.testing.assert_array_equal(a, b)
    assert restored[1].head.centers.shape[0] == 37
    assert not restored[8].head.centers[37:].any()  # padding rows stay zero
    ckpt.close()


def test_storage_dtype_changes_on_restore(runs, tmp_path):
    """The float32 checkpoint at step 6 restores into a bfloat16-storage run (centers and
    momentum rounded to nearest, kept as uint16 bits), and a bfloat16 checkpoint back into
    float32 (exactly)."""
    import jax.numpy as jnp

    from pfc_jax import sharding, train
    from pfc_jax.heads import storage

    bf16 = recipes.load("synthetic", [*TINY, "--config.head.storage_dtype=bfloat16"])
    f32 = recipes.load("synthetic", TINY)
    mesh = sharding.make_mesh(jax.devices()[:4])
    trainer = lambda config: train.build(config, mesh, num_classes=37, num_examples=148).trainer
    ckpt = checkpoint.Checkpointer(runs["copies"][1] / "checkpoints", read_only=True)  # step 6 @ 8 devices, fp32
    as_f32, _, _ = ckpt.restore(6, trainer(f32).abstract_state)
    as_bf16, data, meta = ckpt.restore(6, trainer(bf16).abstract_state)
    rows = lambda s: [s.head.centers, s.head.opt_state[1][0].trace]  # SGD: (decay, (trace,...))
    for a, b in zip(rows(as_f32), rows(as_bf16)):
        assert a.dtype == np.float32 and b.dtype == np.uint16
        assert b.sharding == a.sharding  # each device its own rows
        rounded = np.asarray(a.astype(jnp.bfloat16), np.float32)
        np.testing.assert_array_equal(np.asarray(storage.widen(b)), rounded)

    written = checkpoint.Checkpointer(tmp_path / "checkpoints", async_save=False)
    written.save(as_bf16, data, meta)
    back, _, _ = written.restore(6, trainer(f32).abstract_state)
    for a, b in zip(rows(as_bf16), rows(back)):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(b), np.asarray(storage.widen(a)))
    written.close()
    ckpt.close()


def test_each_backbone_family_trains_and_resumes(tmp_path):
    """The synthetic demo with the narrow ViT, VarGFaceNet and ShuffleMixFaceNet: 4 steps,
    stopped after 2 and resumed by a new process; the loss is logged and finite. (The
    three families run side by side.)"""
    names = ["vit_narrow", "vargfacenet_narrow", "shufflemixfacenet_narrow"]
    flags = lambda name: [f"--config.model.name={name}", "--config.total_steps=4", "--config.checkpoint_every_steps=2"]
    firsts = [start_main(tmp_path / n, *flags(n), "--config.stop_at_step=2", devices=2) for n in names]
    for name, first in zip(names, map(finish, firsts)):
        assert first.returncode == 0, (name, first.stderr[-3000:])
    seconds = [start_main(tmp_path / n, *flags(n), devices=2) for n in names]
    for name, second in zip(names, map(finish, seconds)):
        assert second.returncode == 0, (name, second.stderr[-3000:])
        assert "resumed from checkpoint step 2" in second.stdout and "done: step 4" in second.stdout, name
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3, 4], name
        assert all(np.isfinite(r["loss"]) for r in records), name


def test_converted_arcface_workdir_trains_and_starts_other_runs(tmp_path):
    """A workdir converted from arcface_torch files (backbone + 37 centers in 3 rank files)
    trains with `main` on 2 devices from exactly those weights (a vanishing learning rate
    keeps them), and `config.init_from` starts another run from its backbone."""
    from pfc_jax.convert import arcface_torch
    from tests import torch_writer
    from tests.test_convert import _backbone_file, _rank_files

    path, _ = _backbone_file(tmp_path, "iresnet_narrow")
    centers = np.random.default_rng(4).normal(size=(37, 16)).astype(np.float32)
    _rank_files(tmp_path / "arcface", centers, 3)
    assert torch_writer.STORAGE_TYPES  # the files above are the test's own torch.save format
    arcface_torch.convert(path, "iresnet_narrow", tmp_path / "run", centers=tmp_path / "arcface", image_size=32)
    imported = checkpoint.read_initial(tmp_path / "run", centers=False)

    flags = ["--config.total_steps=2", "--config.optimizer.lr=1e-12", "--config.schedule.warmup_epochs=0"]
    first = run_main(tmp_path / "run", *flags, devices=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "step 0 (backbone and 37 class centers)" in first.stdout and "done: step 2" in first.stdout
    trained = train_tree(tmp_path / "run", 2)
    flat = lambda tree: {
        jax.tree_util.keystr(p).replace("'", ""): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    got, want = flat(trained["backbone"]["params"]), flat(imported.params)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(trained["train"]["head"]["centers"][:37], centers, rtol=1e-5, atol=1e-6)

    second = run_main(tmp_path / "other", *flags, f"--config.init_from={tmp_path / 'run'}", devices=2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "run step 2 (backbone; head fresh)" in second.stdout


def test_backbone_export_loads_without_centers(runs):
    model, spec, step, encoder = checkpoint.load_backbone(runs["a"])
    assert encoder == "online"
    assert step == 12 and spec.name == "iresnet_narrow"
    y = model(np.zeros((2, 32, 32, 3), np.float32), train=False)
    assert y.shape == (2, 16) and np.isfinite(y).all()
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint for step 5"):
        checkpoint.load_backbone(runs["a"], step=5)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoints/ directory"):
        checkpoint.load_backbone(runs["a"] / "nowhere")


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(
        main_cmd(
            tmp_path,
            "--config.total_steps=100000",
            "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=100000",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(8),
        cwd=ROOT,
    )
    deadline = time.time() + 300
    for line in proc.stdout:
        if line.startswith("[") and int(line[1:].split("/")[0]) >= 3:
            break
        assert time.time() < deadline, "no progress"
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved checkpoint step" in rest
    step = int(rest.split("SIGTERM: saved checkpoint step ")[1].split()[0])
    assert step >= 3
    assert (tmp_path / "checkpoints" / str(step)).is_dir(), sorted(os.listdir(tmp_path / "checkpoints"))


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = run_main(
        tmp_path,
        "--config.optimizer.lr=1e30",
        "--config.optimizer.clip_grad_norm=0",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=1",
        "--config.schedule.warmup_epochs=0",
    )
    assert out.returncode == 1
    assert "non-finite training at step" in out.stderr and "is intact" in out.stderr
    bad = int(out.stderr.split("non-finite training at step ")[1].split()[0])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert saved and max(saved) == bad - 1
    tree = train_tree(tmp_path, max(saved))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(tree) if x.dtype.kind == "f")


def test_bad_config_stops_before_compiling(tmp_path):
    out = run_main(tmp_path, "--config.head.sample_rate=1.5")
    assert out.returncode == 2
    assert "config.head.sample_rate = 1.5: must be in [0.0, 1.0]" in out.stderr
    assert "compiled step" not in out.stdout
    out = run_main(tmp_path, "--config.global_batch_size=12")
    assert out.returncode == 2 and "multiple of grad_accum_steps x devices" in out.stderr


def test_trains_from_recordio_and_tfds_datasets(tmp_path):
    """The real data path end to end: synthetic identities written as RecordIO, converted
    to TFDS, and each trained on for a few steps by the real main."""
    from pfc_jax.data import synth

    rec = tmp_path / "rec"
    synth.write(str(rec), identities=20, images_per_id=4, image_size=32, pairs=0, progress=False)
    prep = subprocess.run(
        [
            sys.executable,
            "-m",
            "pfc_jax.data.prepare",
            "--source",
            f"rec:{rec}",
            "--name",
            "synth_rec",
            "--data-dir",
            str(tmp_path / "tfds"),
        ],
        capture_output=True,
        text=True,
        env=env(1),
        cwd=ROOT,
    )
    assert prep.returncode == 0, prep.stderr[-2000:]
    runs = {
        "recordio": ["--config.data.source=recordio", f"--config.data.path={rec}"],
        "tfds": [
            "--config.data.source=tfds",
            f"--config.data.path={tmp_path / 'tfds'}",
            "--config.data.tfds_name=synth_rec",
            "--config.data.augment.blur=0.5",
        ],
    }
    for name, flags in runs.items():
        out = run_main(
            tmp_path / f"run_{name}", *flags, "--config.total_steps=3", "--config.log_every_steps=1", devices=2
        )
        assert out.returncode == 0, (name, out.stderr[-3000:])
        assert "20 classes on 2 device(s)" in out.stdout and "80 images" in out.stdout
        records = [json.loads(line) for line in (tmp_path / f"run_{name}" / "metrics.jsonl").read_text().splitlines()]
        assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    missing = run_main(tmp_path / "run_missing", "--config.data.source=recordio", f"--config.data.path={tmp_path}")
    assert missing.returncode == 2 and "train.rec not found" in missing.stderr
