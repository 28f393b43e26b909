"""Several processes, one run: `jax.distributed` on localhost, gloo collectives on CPU.

Two processes x 4 fake CPU devices (launched by launch/local_multiprocess.sh) must train
exactly like one process x 8 devices (up to floating-point reduction order), save and
resume together, write their checkpoint so that one process can continue it, report from
process 0 only, and stop together when only one of them gets SIGTERM.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pfc_jax import checkpoint, distributed
from tests import recipes

ROOT = pathlib.Path(__file__).parents[1]
LAUNCH = ROOT / "launch" / "local_multiprocess.sh"
# 37 identities (40 rows on 8 devices) x 4 images, batch 16: the run crosses an epoch.
TINY = [
    "--config.model.name=mlp",
    "--config.model.embedding_dim=16",
    "--config.data.image_size=32",
    "--config.global_batch_size=16",
    "--config.data.synthetic.num_identities=37",
    "--config.data.synthetic.images_per_identity=4",
    "--config.data.threads=1",
    "--config.total_steps=8",
    "--config.log_every_steps=2",
    "--config.checkpoint_every_steps=3",
]
NO_EVAL = "--config.eval.bins="


def env(devices=None):
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if devices:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return e


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main_args(workdir, *overrides):
    return ["--config", str(ROOT / "configs" / "synthetic.py"), "--workdir", str(workdir), *TINY, *overrides]


def launch(workdir, logs, *overrides, processes=2, devices=4):
    """The launcher script, as a user runs it."""
    e = env()
    e.update(PYTHON=sys.executable, PFC_LOG_DIR=str(logs))
    return subprocess.run(
        ["bash", str(LAUNCH), str(processes), str(devices), *main_args(workdir, *overrides)],
        capture_output=True,
        text=True,
        timeout=300,
        env=e,
        cwd=ROOT,
    )


def single(workdir, *overrides, devices=8):
    return subprocess.run(
        [sys.executable, "-m", "pfc_jax.main", *main_args(workdir, *overrides)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env(devices),
        cwd=ROOT,
    )


def saved(workdir, step):
    """The `train` and `backbone` items of a checkpoint as numpy, whatever devices wrote it."""
    out = {}
    for item in ("train", "backbone"):
        path = pathlib.Path(workdir) / "checkpoints" / str(step) / item
        ckptr = ocp.PyTreeCheckpointer()
        tree = ckptr.metadata(path)
        tree = getattr(tree, "item_metadata", tree)  # newer Orbax wraps the tree's metadata
        tree = getattr(tree, "tree", tree)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        out[item] = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return out


def assert_trees_close(a, b):
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
    assert len(flat_a) == len(flat_b) > 10
    for path, x in flat_a:
        x, y, name = np.asarray(x), np.asarray(flat_b[path]), jax.tree_util.keystr(path)
        assert x.shape == y.shape, name
        if x.dtype.kind == "f":
            # gloo and the in-process all-reduce sum in different orders: a few ulps per step.
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * float(np.abs(y).max() or 1), err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def steps_logged(workdir):
    """Steps of the training records (verification adds records of its own)."""
    return [r["step"] for r in records(workdir) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """mp: 2 processes x 4 devices, stopped at step 3, then resumed (2 x 4 again) to step 6
    with verification at its end. sp: 1 process x 8 devices straight to step 6."""
    base = tmp_path_factory.mktemp("mp")
    mp, sp = base / "mp", base / "sp"
    first = launch(mp, base / "logs1", NO_EVAL, "--config.stop_at_step=3")
    second = launch(mp, base / "logs2", "--config.eval.bins=synthetic", "--config.stop_at_step=6")
    one = single(sp, NO_EVAL, "--config.stop_at_step=6")
    return dict(base=base, mp=mp, sp=sp, first=first, second=second, one=one)


def test_two_processes_train_like_one(runs):
    for name in ("first", "second", "one"):
        out = runs[name]
        assert out.returncode == 0, (name, out.stdout[-2000:], out.stderr[-3000:])
    assert "37 classes on 8 device(s) in 2 processes" in runs["first"].stdout
    assert "resumed from checkpoint step 3" in runs["second"].stdout
    assert_trees_close(saved(runs["mp"], 6), saved(runs["sp"], 6))
    meta = json.loads((runs["mp"] / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["num_devices"] == 8


def test_only_process_zero_reports(runs):
    mp, base = runs["mp"], runs["base"]
    assert steps_logged(mp) == [1, 2, 3, 4, 6]  # each step once (first, every 2, last): process 1 writes nothing
    assert [r["step"] for r in records(mp) if "loss" not in r] == [6]  # verification, once
    assert len(list((mp / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per run
    assert "[6/8]" in runs["second"].stdout and "eval step 6" in runs["second"].stdout
    for logs in ("logs1", "logs2"):
        other = (base / logs / "process_1.log").read_text()
        assert "initialized a new run" not in other and "resumed from" not in other
        assert "[6/8]" not in other and "eval step" not in other and "config:" not in other


def test_checkpoint_restores_in_one_process(runs):
    """The 2 x 4 checkpoint restores in this single process (8 devices) as the trainer
    restores it, equal to the 1 x 8 one; the backbone alone loads; a single process on
    one device continues the run."""
    from pfc_jax import sharding, train

    setup = train.build(recipes.load("synthetic", TINY), sharding.make_mesh(), num_classes=37, num_examples=148)
    abstract = setup.trainer.abstract_state
    restored = {}
    for name in ("mp", "sp"):
        ckpt = checkpoint.Checkpointer(runs[name] / "checkpoints")
        state, data, meta = ckpt.restore(6, abstract)
        ckpt.close()
        assert len(state.head.centers.sharding.device_set) == 8 and meta["num_devices"] == 8
        restored[name] = jax.tree.map(np.asarray, state)
    assert_trees_close(restored["mp"], restored["sp"])

    model, _, step, _ = checkpoint.load_backbone(runs["mp"])
    assert step == 6 and model(np.zeros((2, 32, 32, 3), np.float32), train=False).shape == (2, 16)

    workdir = runs["base"] / "mp_on_1"
    shutil.copytree(runs["mp"], workdir)
    out = single(workdir, NO_EVAL, devices=1)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from checkpoint step 6" in out.stdout and "37 classes on 1 device(s)" in out.stdout
    assert saved(workdir, 8)["train"]["head"]["centers"].shape == (37, 16)


def test_continuing_in_one_process_sees_the_same_batches(runs):
    """The 2 x 4 and the 1 x 8 checkpoints at step 6, each continued by one process to step
    8, end equal: the data position does not depend on the process count."""
    continued = {}
    for name in ("mp", "sp"):
        workdir = runs["base"] / f"{name}_again_on_1"
        shutil.copytree(runs[name], workdir)
        out = single(workdir, NO_EVAL, devices=1)
        assert out.returncode == 0, out.stderr[-3000:]
        continued[name] = saved(workdir, 8)
    assert_trees_close(continued["mp"], continued["sp"])


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    port = free_port()
    procs, logs = [], []
    for i in range(2):
        args = main_args(
            tmp_path / "run",
            NO_EVAL,
            "--config.total_steps=100000",
            "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=100000",
            f"--coordinator=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        )
        logs.append(open(tmp_path / f"process_{i}.err", "w"))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pfc_jax.main", *args],
                stdout=subprocess.PIPE,
                stderr=logs[-1],
                text=True,
                env=env(4),
                cwd=ROOT,
            )
        )
    try:
        deadline = time.time() + 120
        for line in procs[0].stdout:
            progress = re.match(r"\[\s*(\d+)/", line)  # not gloo's "[Gloo] ..." lines
            if progress and int(progress.group(1)) >= 2:
                break
            assert time.time() < deadline, "no progress"
        procs[1].send_signal(signal.SIGTERM)  # e.g. one host of the job is preempted
        rest, _ = procs[0].communicate(timeout=120)
        procs[1].communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    errors = [(tmp_path / f"process_{i}.err").read_text()[-2000:] for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert "SIGTERM: saved checkpoint step" in rest, errors
    step = int(rest.split("SIGTERM: saved checkpoint step ")[1].split()[0])
    assert step >= 2 and (tmp_path / "run" / "checkpoints" / str(step)).is_dir()
    assert steps_logged(tmp_path / "run") == list(range(1, step + 1))


def test_a_slurm_step_is_detected(tmp_path):
    """No flags: the SLURM variables of a 2-task srun step are enough (both tasks on this
    machine; JAX_COORDINATOR_PORT picks a free port instead of the job-id-derived one)."""
    port = free_port()
    procs = []
    for i in range(2):
        e = env(4)
        e.update(
            SLURM_JOB_ID="4242",
            SLURM_STEP_NODELIST="localhost",
            SLURM_NTASKS="2",
            SLURM_PROCID=str(i),
            SLURM_LOCALID=str(i),
            JAX_COORDINATOR_PORT=str(port),
        )
        args = main_args(tmp_path, NO_EVAL, "--config.total_steps=4", "--config.log_every_steps=4")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pfc_jax.main", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=e,
                cwd=ROOT,
            )
        )
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    assert "37 classes on 8 device(s) in 2 processes" in outs[0] and "done: step 4" in outs[0]
    assert steps_logged(tmp_path) == [1, 4]  # the first step and the last


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--process_id=1"], "--process_id=1 without --num_processes"),
        (
            ["--num_processes=2", "--process_id=2", "--coordinator=localhost:1234"],
            "--process_id=2 is out of range for --num_processes=2",
        ),
    ],
)
def test_main_rejects_inconsistent_flags(tmp_path, flags, message):
    out = subprocess.run(
        [sys.executable, "-m", "pfc_jax.main", *main_args(tmp_path, *flags)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(1),
        cwd=ROOT,
    )
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "config.json").exists()


# ---- The decision alone (pure: flags and an environment in, a plan out) -------------------

SLURM = {
    "SLURM_JOB_ID": "17",
    "SLURM_STEP_NODELIST": "node[01-02]",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "3",
}


@pytest.mark.parametrize(
    "kwargs,environ,expected",
    [
        ({}, {}, ("single", None, None, None)),
        ({"coordinator": "h:1", "num_processes": 2, "process_id": 1}, {}, ("explicit", "h:1", 2, 1)),
        (
            {},
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "0"},
            ("explicit", "h:1", 4, 0),
        ),
        (
            {"process_id": 2},
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "0"},
            ("explicit", "h:1", 4, 2),
        ),  # a flag wins over its variable
        ({"num_processes": 1}, {}, ("single", None, None, None)),
        ({}, SLURM, ("detect", None, None, None)),
        ({"coordinator": "node01:9999"}, SLURM, ("detect", "node01:9999", None, None)),
        ({}, {**SLURM, "SLURM_STEP_NUM_TASKS": "1"}, ("single", None, None, None)),  # the batch script
        ({}, {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, ("single", None, None, None)),
        ({}, {"OMPI_COMM_WORLD_SIZE": "8"}, ("detect", None, None, None)),
    ],
)
def test_plan(kwargs, environ, expected, monkeypatch):
    monkeypatch.setattr(distributed, "_tpu_runtime_installed", lambda: False)
    p = distributed.plan(**kwargs, env=environ)
    assert (p.mode, p.coordinator, p.num_processes, p.process_id) == expected


@pytest.mark.parametrize(
    "kwargs,environ,message",
    [
        ({"process_id": 0}, {}, "--process_id=0 without --num_processes"),
        ({"num_processes": 2, "coordinator": "h:1"}, {}, "without --process_id"),
        ({"num_processes": 2, "process_id": 2, "coordinator": "h:1"}, {}, "out of range"),
        ({"num_processes": 2, "process_id": -1, "coordinator": "h:1"}, {}, "out of range"),
        ({"num_processes": 0, "process_id": 0}, {}, "must be >= 1"),
        ({"num_processes": 2, "process_id": 0}, {}, "needs --coordinator=HOST:PORT"),
        ({"coordinator": "h:1"}, {}, "without --num_processes and --process_id"),
        ({"coordinator": "h", "num_processes": 2, "process_id": 0}, {}, "expected HOST:PORT"),
        ({"coordinator": "h:99999", "num_processes": 2, "process_id": 0}, {}, "expected HOST:PORT"),
        ({}, {"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two' is not an integer"),
        ({}, {"JAX_PROCESS_ID": "1"}, "JAX_PROCESS_ID=1 without --num_processes"),
    ],
)
def test_plan_rejects_inconsistent_settings(kwargs, environ, message, monkeypatch):
    monkeypatch.setattr(distributed, "_tpu_runtime_installed", lambda: False)
    with pytest.raises(distributed.DistributedError, match=re.escape(message)):
        distributed.plan(**kwargs, env=environ)
