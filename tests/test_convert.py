"""Importing arcface_torch files without PyTorch: the torch-file reader, the weight
mapping, center shards, the converted workdir and bad input."""

import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pfc_jax import checkpoint, models, sharding
from pfc_jax.convert import arcface_torch, names, torch_file
from pfc_jax.errors import InputError
from pfc_jax.heads import margins
from pfc_jax.heads.partial_fc import PartialFC
from tests import torch_writer as tw
from tests.cli_helpers import exits_with


def test_reader_reads_dtypes_views_and_state_dict_metadata(tmp_path):
    base = np.arange(24, dtype=np.float32)
    rng = np.random.default_rng(0)
    half = rng.normal(size=(3, 5)).astype(np.float16)
    bf16 = rng.normal(size=(4,)).astype(jnp.bfloat16)
    obj = tw.StateDict(
        {
            "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "half": half,
            "bf16": bf16,
            "bn.num_batches_tracked": np.array(7, np.int64),
            "transposed": tw.Tensor(base, "shared", 0, (6, 4), (1, 6)),
            "row1": tw.Tensor(base, "shared", 6, (6,), (1,)),
            "broadcast": tw.Tensor(base[:3].copy(), "small", 0, (2, 3), (0, 1)),
            "empty": np.zeros((0, 4), np.float32),
        }
    )
    path = tmp_path / "m.pth"
    tw.save(obj, path)
    got = torch_file.load(path)
    assert list(got) == list(obj) and got._metadata == {"": {"version": 1}}
    np.testing.assert_array_equal(got["conv.weight"], obj["conv.weight"])
    assert got["half"].dtype == np.float16 and np.array_equal(got["half"], half)
    assert got["bf16"].dtype == jnp.bfloat16 and np.array_equal(got["bf16"], bf16)
    assert got["bn.num_batches_tracked"].shape == () and int(got["bn.num_batches_tracked"]) == 7
    np.testing.assert_array_equal(got["transposed"], base.reshape(4, 6).T)
    np.testing.assert_array_equal(got["row1"], base[6:12])
    np.testing.assert_array_equal(got["broadcast"], np.tile(base[:3], (2, 1)))
    assert got["empty"].shape == (0, 4)
    # a nested checkpoint (arcface_torch's checkpoint_gpu_<rank>.pt) with its plain values
    tw.save({"epoch": 3, "lr": 0.1, "betas": (0.9, 0.999), "ok": True, "none": None, "sd": obj}, tmp_path / "c.pt")
    nested = torch_file.load(tmp_path / "c.pt")
    assert (nested["epoch"], nested["lr"], nested["betas"], nested["ok"], nested["none"]) == (
        3,
        0.1,
        (0.9, 0.999),
        True,
        None,
    )
    np.testing.assert_array_equal(nested["sd"]["half"], half)


@pytest.mark.parametrize("stack", [False, True], ids=["GLOBAL", "STACK_GLOBAL"])
def test_reader_refuses_any_other_global_and_runs_nothing(tmp_path, stack):
    marker = tmp_path / "pwned"
    payload = tw.Global("os", "system", (f"touch {marker}",), stack=stack)
    path = tmp_path / "evil.pth"
    tw.save({"weight": np.ones(3, np.float32), "num_batches_tracked": payload}, path)
    with pytest.raises(torch_file.TorchFileError, match=r"refused: its pickle names os\.system"):
        torch_file.load(path)
    assert not marker.exists()
    tw.save({"x": tw.Global("builtins", "eval", ("1",))}, path)
    with pytest.raises(torch_file.TorchFileError, match=r"builtins\.eval"):
        torch_file.load(path)


def test_reader_names_what_is_wrong_with_a_file(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(torch_file.TorchFileError, match="not a torch.save file"):
        torch_file.load(text)
    with pytest.raises(torch_file.TorchFileError, match="no such file"):
        torch_file.load(tmp_path / "missing.pth")
    legacy = tmp_path / "old.pth"
    legacy.write_bytes(torch_file.LEGACY_MAGIC + b"\x2e")
    with pytest.raises(torch_file.TorchFileError, match="legacy format of PyTorch < 1.6"):
        torch_file.load(legacy)
    plain_zip = tmp_path / "plain.pth"
    with zipfile.ZipFile(plain_zip, "w") as z:
        z.writestr("folder/readme.txt", "hello")
    with pytest.raises(torch_file.TorchFileError, match="no folder/data.pkl"):
        torch_file.load(plain_zip)
    short = tmp_path / "short.pth"  # a storage shorter than its reference says
    tw.save({"w": np.ones(4, np.float32)}, short)
    with zipfile.ZipFile(short) as z:
        records = {n: z.read(n) for n in z.namelist()}
    records["archive/data/0"] = records["archive/data/0"][:8]
    with zipfile.ZipFile(short, "w") as z:
        for n, data in records.items():
            z.writestr(n, data)
    with pytest.raises(torch_file.TorchFileError, match="storage 0 holds 8 bytes"):
        torch_file.load(short)
    bomb = tmp_path / "bomb.pth"  # a broadcast view asking for 10^12 elements of a 3-element storage
    tw.save({"x": tw.Tensor(np.ones(3, np.float32), "s", 0, (10**6, 10**6), (0, 0))}, bomb)
    with pytest.raises(torch_file.TorchFileError, match=r"bomb.pth: a tensor of size \(1000000, 1000000\) is far"):
        torch_file.load(bomb)


def test_arcface_class_split_rule():
    # C = 10 on 3 ranks: 4, 3, 3 classes starting at 0, 4, 7
    assert [arcface_torch.num_local(10, 3, r) for r in range(3)] == [4, 3, 3]
    assert [arcface_torch.class_start(10, 3, r) for r in range(3)] == [0, 4, 7]
    for c, w in ((1000, 7), (5, 8), (64, 8)):
        starts = [arcface_torch.class_start(c, w, r) for r in range(w)]
        sizes = [arcface_torch.num_local(c, w, r) for r in range(w)]
        assert sum(sizes) == c and starts == list(np.cumsum([0] + sizes[:-1]))


BACKBONES = ["iresnet_narrow", "mobilefacenet_narrow", "vit_narrow"]
SIZE = 32  # image side: small, as in the other tests of narrow backbones


def _backbone_file(tmp_path, name, dim=16, *, prefix="", seed=1, drop=None, reshape=None):
    """A .pth of backbone ``name`` (random weights, random BN statistics) under
    arcface_torch's names; returns (path, model)."""
    model = models.create(name, embedding_dim=dim, image_size=SIZE, seed=seed)
    state = nnx.state(model, nnx.BatchStat)  # non-trivial statistics, so a mix-up shows
    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(lambda a: np.asarray(a) + rng.uniform(0.1, 0.5, np.shape(a)).astype(np.float32), state)
    nnx.update(model, noisy)
    sd = names.state_dict(model)
    if drop:
        del sd[drop]
    if reshape:
        sd[reshape] = sd[reshape].reshape(-1)
    path = tmp_path / f"{name}.pth"
    tw.save(tw.StateDict({prefix + k: v for k, v in sd.items()}), path)
    return path, model


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_round_trip_gives_identical_embeddings(tmp_path, name):
    path, model = _backbone_file(tmp_path, name, prefix="module." if name == "iresnet_narrow" else "")
    converted = arcface_torch.convert(path, name, tmp_path / "run", embedding_dim=16, image_size=SIZE)
    assert converted.centers is None
    loaded, spec, step, encoder = checkpoint.load_backbone(tmp_path / "run")
    assert (spec.name, spec.embedding_dim, step, encoder) == (name, 16, 0, "online")
    x = np.random.default_rng(2).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    forward = nnx.jit(lambda m, x: m(x, train=False))
    np.testing.assert_array_equal(np.asarray(forward(loaded, x)), np.asarray(forward(model, x)))


def _rank_files(directory, centers, world, kind="softmax_fc_gpu"):
    directory.mkdir(parents=True, exist_ok=True)
    c = len(centers)
    for r in range(world):
        start, n = arcface_torch.class_start(c, world, r), arcface_torch.num_local(c, world, r)
        shard = centers[start : start + n]
        if kind == "softmax_fc_gpu":
            tw.save(tw.StateDict({"weight": shard}), directory / f"softmax_fc_gpu_{r}.pt", location=f"cuda:{r}")
        else:
            sd = tw.StateDict({"weight": shard})
            tw.save({"epoch": 1, "global_step": 10, "state_dict_softmax_fc": sd}, directory / f"checkpoint_gpu_{r}.pt")


@pytest.fixture(scope="module")
def converted_with_centers(tmp_path_factory):
    """mobilefacenet_narrow, 16-d, with 10 class centers from 3 rank files (10 mod 3 = 1)."""
    tmp = tmp_path_factory.mktemp("centers")
    path, _ = _backbone_file(tmp, "mobilefacenet_narrow")
    centers = np.random.default_rng(3).normal(size=(10, 16)).astype(np.float32)
    _rank_files(tmp / "arcface_run", centers, 3)
    out = arcface_torch.convert(
        path, "mobilefacenet_narrow", tmp / "run", centers=tmp / "arcface_run", num_classes=10, image_size=SIZE
    )
    return tmp / "run", centers, out


@pytest.mark.parametrize("devices", [1, 2, 8])
def test_centers_land_in_every_class_row_on_any_device_count(converted_with_centers, devices):
    workdir, centers, out = converted_with_centers
    assert out.centers.world == 3 and out.centers.kind == "softmax_fc_gpu_<rank>.pt"
    initial = checkpoint.read_initial(workdir, centers=True)
    np.testing.assert_array_equal(initial.centers, centers)
    mesh = sharding.make_mesh(jax.devices()[:devices])
    head = PartialFC(mesh, 10, 16, 1.0, margins.arcface(), optax.sgd(0.1))
    state = head.init_from_centers(initial.centers)
    rows = sharding.rows_per_shard(10, devices)
    for shard in state.centers.addressable_shards:
        index = list(mesh.devices.flat).index(shard.device)  # device i holds classes [i * rows, (i + 1) * rows)
        assert (shard.index[0].start or 0) == index * rows
        local = np.asarray(shard.data)
        for row in range(rows):
            c = index * rows + row
            want = centers[c] if c < 10 else np.zeros(16, np.float32)
            np.testing.assert_array_equal(local[row], want, err_msg=f"class {c} on device {index}")


def test_centers_from_checkpoint_files_and_their_errors(tmp_path):
    centers = np.arange(7 * 4, dtype=np.float32).reshape(7, 4)
    _rank_files(tmp_path / "ck", centers, 2, kind="checkpoint_gpu")
    got = arcface_torch.read_centers(tmp_path / "ck")
    assert got.kind == "checkpoint_gpu_<rank>.pt" and np.array_equal(got.centers, centers)
    with pytest.raises(InputError, match="--num-classes 8, but the 2 rank files"):
        arcface_torch.read_centers(tmp_path / "ck", 8)
    os.remove(tmp_path / "ck" / "checkpoint_gpu_0.pt")
    with pytest.raises(InputError, match=r"rank\(s\) \[0\] missing"):
        arcface_torch.read_centers(tmp_path / "ck")
    # rank files that don't follow the split rule (4 + 3 expected for 7 classes on 2 ranks)
    (tmp_path / "odd").mkdir()
    tw.save({"weight": centers[:3]}, tmp_path / "odd" / "softmax_fc_gpu_0.pt")
    tw.save({"weight": centers[3:]}, tmp_path / "odd" / "softmax_fc_gpu_1.pt")
    with pytest.raises(InputError, match="holds 3 centers; with 7 classes on 2 ranks, rank 0 holds 4"):
        arcface_torch.read_centers(tmp_path / "odd")


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", r"1 keys missing \(features\.layers\.3\.running_var\)"),
        ("shape", r"linear\.weight|features\.layers\.2\.weight has shape"),
        ("model", r"--model 'resnet9': unknown backbone"),
        ("not_torch", "not a torch.save file"),
        ("not_empty", "exists and is not empty"),
    ],
)
def test_bad_input_is_named_and_nothing_is_written(tmp_path, case, match):
    kwargs = {"drop": "features.layers.3.running_var"} if case == "missing" else {}
    if case == "shape":
        kwargs = {"reshape": "features.layers.2.weight"}
    path, _ = _backbone_file(tmp_path, "mobilefacenet_narrow", **kwargs)
    model = "resnet9" if case == "model" else "mobilefacenet_narrow"
    if case == "not_torch":
        path.write_bytes(b"\x00" * 64)
    workdir = tmp_path / "run"
    if case == "not_empty":
        workdir.mkdir()
        (workdir / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match=match):
        arcface_torch.convert(path, model, workdir, embedding_dim=16, image_size=SIZE)
    expected = ["keep.txt"] if case == "not_empty" else None
    assert (sorted(p.name for p in workdir.iterdir()) if workdir.exists() else None) == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # no staging left


def test_command_line_converts_and_refuses_with_one_error_line(tmp_path, capsys):
    from pfc_jax.convert import main

    path, _ = _backbone_file(tmp_path, "mobilefacenet_narrow")
    flags = ["from-arcface-torch", "--backbone", str(path), "--model", "mobilefacenet_narrow", "--embedding-dim", "16"]
    flags += ["--image-size", str(SIZE)]
    main([*flags, "--workdir", str(tmp_path / "run")])
    assert "converted mobilefacenet_narrow (" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoints" / "0" / "backbone").is_dir()
    flags[2] = str(tmp_path / "nope.pth")
    with exits_with(capsys, "nope.pth: no such file"):
        main([*flags, "--workdir", str(tmp_path / "run2")])
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize("name", ["vargfacenet_narrow", "shufflemixfacenet_narrow", "mixfacenet_xs"])
def test_every_family_maps_to_its_reference_names_and_back(name):
    model = nnx.eval_shape(lambda: models.create(name, embedding_dim=16, image_size=SIZE))
    ours = jax.tree.map(lambda a: np.random.default_rng(0).normal(size=a.shape).astype(np.float32), nnx.state(model))
    nnx.update(model, ours)
    sd = names.state_dict(model)
    assert len(set(sd)) == len(sd) and all(np.all(np.isfinite(v)) for v in sd.values())
    back = names.assign(model, sd)
    want = nnx.to_pure_dict(ours)
    flat = lambda t: dict(jax.tree_util.tree_flatten_with_path(t)[0])
    assert flat(back).keys() == flat(want).keys()
    for path, value in flat(want).items():
        np.testing.assert_array_equal(flat(back)[path], value, err_msg=str(path))


def test_init_from_centers_needs_init_from():
    from pfc_jax.config_validation import ConfigError, validate
    from tests import recipes

    config = recipes.load("synthetic")
    config.init_from_centers = True
    with pytest.raises(ConfigError, match="init_from_centers = True: needs config.init_from"):
        validate(config, num_devices=1)
