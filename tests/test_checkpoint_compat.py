"""Checkpoints written by 0.1.0 (a loose model dict in their metadata) still load and resume."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np

from pfc_jax import checkpoint
from pfc_jax.models import ModelSpec

ROOT = pathlib.Path(__file__).parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "workdir_v0"
# The flags the fixture was written with (tests/fixtures/README.md).
FLAGS = [
    "--config.model.name=iresnet_narrow",
    "--config.model.embedding_dim=8",
    "--config.data.image_size=16",
    "--config.global_batch_size=8",
    "--config.data.synthetic.num_identities=11",
    "--config.data.synthetic.images_per_identity=2",
    "--config.checkpoint_every_steps=2",
    "--config.eval.bins=",
    "--config.tensorboard=False",
    "--config.data.threads=1",
]


def test_old_metadata_reads_as_a_spec():
    meta = json.loads((FIXTURE / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert "dtype" not in meta["model"]  # the old layout
    assert checkpoint.read_spec(meta) == ModelSpec("iresnet_narrow", 8, 16, 0.0, "float32")


def test_old_backbone_loads_for_inference():
    model, spec, step, encoder = checkpoint.load_backbone(FIXTURE)
    assert encoder == "online"  # 0.1.0 kept no EMA
    assert step == 2 and spec.name == "iresnet_narrow" and spec.embedding_dim == 8
    out = np.asarray(model(np.zeros((3, 16, 16, 3), np.float32), train=False))
    assert out.shape == (3, 8) and np.isfinite(out).all()


def test_old_workdir_resumes_on_eight_devices(tmp_path):
    workdir = shutil.copytree(FIXTURE, tmp_path / "workdir")
    out = subprocess.run(
        [sys.executable, "-m", "pfc_jax.main", "--config", str(ROOT / "configs" / "synthetic.py"),
         "--workdir", str(workdir), *FLAGS, "--config.total_steps=4"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from checkpoint step 2" in out.stdout and "on 8 device(s)" in out.stdout
    meta = json.loads((workdir / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert ModelSpec.from_dict(meta["model"]).same_network(ModelSpec("iresnet_narrow", 8, 16))
    assert meta["head"] == "partial_fc"
