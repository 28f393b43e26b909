"""The benchmark CLI runs end to end and reports what it promises (no timing asserts)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from pfc_jax import xla_defaults
from tests.cli_helpers import exits_with


def bench_env():
    # The bench fakes its own CPU devices; drop the 8 that conftest asked for.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    xla_defaults.apply(env)  # what the bench's own import of pfc_jax does
    return {**env, "JAX_PLATFORMS": "cpu"}


def run_bench(*args):
    return subprocess.run(
        [sys.executable, "-m", "pfc_jax.bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=pathlib.Path(__file__).parents[1],
        env=bench_env(),
    )


def test_head_json_on_fake_devices():
    out = run_bench(
        "head",
        "--classes",
        "1003",
        "--batch",
        "32",
        "--dim",
        "16",
        "--rate",
        "0.1",
        "--devices",
        "4",
        "--steps",
        "3",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["devices"] == 4 and result["platform"] == "cpu"
    assert result["num_local"] == 251 and result["num_sample"] == 32
    assert result["ms_min"] <= result["ms_per_step"] <= result["ms_max"]
    assert result["loss_last"] < result["loss_first"]  # fixed batch: the centers learn it
    assert result["centers_and_state_bytes"] == 251 * 16 * 4 * 2  # + SGD momentum
    assert result["compiled_temp_bytes"] > 0
    assert result["matmul_ms"] > 0  # the step's floor: its three matmuls alone
    assert result["floor_ratio"] == pytest.approx(result["ms_per_step"] / result["matmul_ms"])


def test_dcq_head_json_does_not_grow_with_the_identities():
    """DCQ's head step at 10 million identities: its sizes are those of the queue."""
    out = run_bench(
        "head", "--head", "dcq", "--classes", "10000000", "--batch", "32", "--dim", "16", "--queue-size", "100",
        "--devices", "4", "--steps", "3", "--warmup", "0", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["head"] == "dcq" and result["queue_size"] == 100 and result["rate"] is None
    assert result["num_local"] == 25 and result["centers_and_state_bytes"] == 25 * 17 * 4
    assert result["logits_bytes"] == 32 * 25 * 4
    assert abs(result["loss_first"]) < 1e-6 < result["loss_last"]  # the queue starts empty
    assert result["compiled_total_bytes"] < 2**20
    assert result["matmul_ms"] is None and result["floor_ratio"] is None  # Partial FC's figure
    bad = run_bench("head", "--head", "dcq", "--classes", "10", "--batch", "30", "--queue-size", "8", "--devices", "2")
    assert bad.returncode == 2 and "at least one step's 15 entries" in bad.stderr


def test_f2c_head_json_follows_the_pool():
    """F²C's head step at 10 million identities: its sizes are those of the pool (1 % of
    the identities unless --pool-size)."""
    out = run_bench(
        "head", "--head", "f2c", "--classes", "10000000", "--batch", "32", "--dim", "16", "--pool-size", "100",
        "--devices", "4", "--steps", "3", "--warmup", "0", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["head"] == "f2c" and result["pool_size"] == 100 and result["queue_size"] is None
    assert result["num_local"] == 25 and result["centers_and_state_bytes"] == 25 * (2 * 16 + 3) * 4
    assert result["loss_first"] > 0 and result["compiled_total_bytes"] < 2**20
    bad = run_bench("head", "--head", "f2c", "--classes", "10", "--batch", "30", "--pool-size", "8", "--devices", "2")
    assert bad.returncode == 2 and "at least one step's 15 gallery features" in bad.stderr


def test_head_text_output():
    out = run_bench("head", "--classes", "100", "--batch", "8", "--dim", "8", "--steps", "2")
    assert out.returncode == 0, out.stderr
    assert "sampled per shard" in out.stdout and re.search(r"ms/step +median", out.stdout)


def test_prototype_memory_head_text_follows_the_memory():
    out = run_bench(
        "head", "--head", "prototype_memory", "--classes", "10000000", "--batch", "32", "--dim", "16",
        "--memory-size", "100", "--devices", "4", "--steps", "2", "--warmup", "0",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "memory=100 on 4 x cpu" in out.stdout and re.search(r"memory rows per shard +25\n", out.stdout)
    bad = run_bench("head", "--head", "prototype_memory", "--classes", "10", "--batch", "30", "--memory-size", "8")
    assert bad.returncode == 2 and "at least one step's 30 images" in bad.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--rate", "1.5"], "--rate must be in [0, 1]"),
        (["--batch", "30", "--devices", "4"], "must be a multiple of --devices 4"),
        (["--devices", "0"], "argument --devices: must be >= 1"),
    ],
)
def test_head_bad_arguments(args, message):
    out = run_bench("head", "--classes", "100", "--dim", "8", "--steps", "1", *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert message in out.stderr


def test_train_json_reports_full_step_and_backbone_alone():
    out = run_bench(
        "train",
        "--config",
        "configs/synthetic.py",
        "--backbone",
        "mobilefacenet_narrow",
        "--batch",
        "16",
        "--classes",
        "500",
        "--rate",
        "0.2",
        "--devices",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["benchmark"] == "train" and r["devices"] == 2 and r["classes"] == 500
    assert r["backbone"] == "mobilefacenet_narrow" and r["batch"] == 16 and r["rate"] == 0.2
    assert r["samples_per_sec"] > 0 and r["backbone_samples_per_sec"] > 0
    assert r["head_overhead"] == pytest.approx(r["ms_per_step"] / r["backbone_ms_per_step"] - 1)
    assert r["backbone_share"] == pytest.approx(r["backbone_ms_per_step"] / r["ms_per_step"])
    assert r["cores"] >= 1 and 0 < r["cores_used"] <= 1.1 * r["cores"]
    assert 0 < r["backbone_cores_used"] <= 1.1 * r["cores"]
    assert r["xla_options"] == " ".join(xla_defaults.in_effect(bench_env()))
    assert r["compiled_total_bytes"] > 0


def test_data_json_on_a_recordio_dataset(tmp_path):
    from pfc_jax.data import synth

    synth.write(str(tmp_path / "rec"), identities=8, images_per_id=8, pairs=0, progress=False)
    out = run_bench(
        "data", "--source", f"rec:{tmp_path / 'rec'}", "--batch", "16", "--batches", "2", "--augment", "all", "--json"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["benchmark"] == "data" and r["images"] == 32 and r["images_per_sec"] > 0
    assert r["images_per_cpu_sec"] > 0


def test_data_removes_its_temporary_dataset_on_error(tmp_path, monkeypatch):
    import argparse

    from pfc_jax.bench import data
    from pfc_jax.data import pipeline

    made = tmp_path / "bench_tmp"
    monkeypatch.setattr(data.tempfile, "mkdtemp", lambda **kw: (made.mkdir(), str(made))[1])

    def broken(*args, **kwargs):
        raise RuntimeError("pipeline failed")

    monkeypatch.setattr(pipeline, "make_iterator", broken)
    args = argparse.Namespace(source=None, workers=0, threads=1, batch=8, batches=1, augment="flip")
    with pytest.raises(RuntimeError, match="pipeline failed"):
        data.run(args)
    assert not made.exists()


def test_conv_covers_every_convolution_of_the_network():
    import collections

    from flax import nnx

    from pfc_jax import models
    from pfc_jax.bench.conv import iresnet_convolutions
    from pfc_jax.models.iresnet import IRESNET_LAYERS

    for depth in (18, 50):
        net = nnx.eval_shape(lambda d=depth: models.create(f"iresnet{d}", embedding_dim=8))
        in_net = collections.Counter(
            (m.kernel_size[0], m.in_features, m.out_features, m.strides[0])
            for _, m in nnx.iter_modules(net)
            if isinstance(m, nnx.Conv)
        )
        benched = collections.Counter()
        for c in iresnet_convolutions(IRESNET_LAYERS[depth]):
            benched[c["kernel"], c["cin"], c["cout"], c["stride"]] += c["count"]
        assert benched == in_net


def test_conv_json_times_three_passes_per_convolution():
    out = run_bench("conv", "--batch", "1", "--size", "16", "--steps", "1", "--warmup", "0", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["benchmark"] == "conv" and r["depth"] == 18 and len(r["layers"]) == 17
    assert sum(c["count"] for c in r["layers"]) == 21  # iResNet-18: stem + 4 x (2 blocks x 2 + shortcut)
    for p in ("forward", "input_grad", "weight_grad"):
        assert all(c[p]["ms"] > 0 and c[p]["gflops"] > 0 for c in r["layers"])
        assert r["total_ms"][p] == pytest.approx(sum(c[p]["ms"] * c["count"] for c in r["layers"]))
    assert r["xla_options"] == " ".join(xla_defaults.in_effect(bench_env()))
    bad = run_bench("conv", "--depth", "19")
    assert bad.returncode == 2 and "iResNet depths are 18, 34, 50, 100, 200" in bad.stderr


def test_head_max_classes_finds_the_largest_step_that_fits(capsys):
    from pfc_jax import bench

    def search(gib, storage):  # in this process: its first 2 of 8 devices
        capsys.readouterr()
        bench.main(
            ["head", "--max-classes", "--device-memory", str(gib), "--batch", "32", "--dim", "64",
             "--devices", "2", "--storage-dtype", storage, "--json"]
        )  # fmt: skip
        return json.loads(capsys.readouterr().out)

    f32, bf16 = search(0.02, "float32"), search(0.02, "bfloat16")
    for r in (f32, bf16):
        assert r["benchmark"] == "capacity" and r["devices"] == 2
        assert r["state_bytes"] < r["compiled_total_bytes"] <= r["device_memory_bytes"]
    assert bf16["storage_dtype"] == "bfloat16"
    # the state (centers + momentum) dominates: half the bytes per identity, about twice the identities
    assert bf16["state_bytes"] / bf16["max_classes"] == pytest.approx(f32["state_bytes"] / f32["max_classes"] / 2, 0.01)
    assert 1.8 < bf16["max_classes"] / f32["max_classes"] < 2.2
    for args, message in [
        (["--max-classes"], "--max-classes needs --device-memory GIB"),
        (["--max-classes", "--device-memory", "1", "--classes", "10"], "drop --classes"),
        (["--max-classes", "--device-memory", "1", "--head", "dcq"], "--max-classes is for --head partial_fc"),
        (["--max-classes", "--device-memory", "0.00001"], "not even"),
        (["--device-memory", "1", "--classes", "10"], "--device-memory is for --max-classes"),
        ([], "--classes is required"),
        (["--compile-only"], "--compile-only needs --classes"),
        (["--compile-only", "--classes", "10", "--head", "dcq"], "--compile-only is for --head partial_fc"),
    ]:
        with exits_with(capsys, re.escape(message)):
            bench.main(["head", "--batch", "32", "--dim", "16", "--devices", "2", *args])


def test_head_compile_only_reports_the_memory_of_a_step_too_large_to_run():
    """10M identities on 2 devices at rate 0.1, B 256, D 512, compiled from abstract shapes
    (nothing allocated): beyond the state the step holds the cosines and their gradient
    (2 x B x n x 4 bytes = 1.0 x n x D x 4 here), the sampler's per-row arrays (~6 x 4 bytes
    per row of the shard) and a few blocks, not several n x D buffers; bfloat16 storage
    halves the state and nothing else."""

    def compiled(storage):
        out = run_bench(
            "head", "--compile-only", "--classes", "10000000", "--rate", "0.1", "--batch", "256", "--dim", "512",
            "--devices", "2", "--storage-dtype", storage, "--json",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout)

    f32, bf16 = compiled("float32"), compiled("bfloat16")
    assert f32["benchmark"] == "compiled" and f32["num_sample"] == 500_000
    assert f32["state_bytes"] == 5_000_000 * 512 * 4 * 2 == 2 * bf16["state_bytes"]  # centers + momentum
    for r in (f32, bf16):
        rows = r["num_sample"] * r["dim"] * 4
        assert r["temp_per_sampled_rows"] == pytest.approx(r["compiled_temp_bytes"] / rows)
        assert r["compiled_temp_bytes"] < 1.5 * rows  # the target; ~1.13 x
    assert bf16["compiled_temp_bytes"] == pytest.approx(f32["compiled_temp_bytes"], rel=0.02)


def test_prune_times_the_suppression_and_hits_the_ratio(capsys):
    from pfc_jax import bench

    bench.main(["prune", "--images", "3000", "--dim", "16", "--ratio", "0.7", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["benchmark"] == "prune" and r["images"] == 3000 and r["identities"] > 100
    assert abs(r["kept_at_ratio"] - 2100) <= r["identities"] and r["identities"] <= r["kept_at_threshold"] <= 3000
    assert r["pair_entries"] < 3000**2 / 10  # within identities only
