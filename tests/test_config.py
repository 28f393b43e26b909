"""Configs: every recipe loads, bad values stop early with the field named."""

import pathlib
import re
import runpy

import pytest

from pfc_jax.config_validation import ConfigError, validate, validate_run_length
from pfc_jax.heads.margins import CombinedMargin
from tests.recipes import load

ROOT = pathlib.Path(__file__).parents[1]


def test_synthetic_recipe_is_valid():
    validate(load("synthetic"), num_devices=8)


@pytest.mark.parametrize("name", ["ms1mv3_r50", "glint360k_r100", "webface42m_r100"])
def test_dataset_recipes_ask_for_their_path(name):
    config = load(name)
    assert config.global_batch_size == 1024 and config.dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"config\.data\.path = ''.*needs the folder with train.rec"):
        validate(config, num_devices=8)


@pytest.mark.parametrize("name", ["webface42m_vit_s", "ms1mv2_mixfacenet_m", "ms1mv3_vargfacenet"])
def test_new_backbone_recipes_are_valid_with_a_path(name, tmp_path):
    """The ViT, MixFaceNet and VarGFaceNet recipes: their own optimizer and schedule, valid
    once given a dataset folder."""
    (tmp_path / "train.rec").touch()
    (tmp_path / "train.idx").touch()
    (tmp_path / "property").write_text("10,112,112")
    config = load(name, [f"--config.data.path={tmp_path}"])
    validate(config, num_devices=8)
    assert config.model.name in ("vit_s", "mixfacenet_m", "vargfacenet")
    assert config.optimizer.name == ("adamw" if name.startswith("webface") else "sgd")


@pytest.mark.parametrize("name", ["ms1mv3_r50", "glint360k_r100", "webface42m_r100"])
def test_dataset_recipes_use_arcface_torch_margin_semantics(name):
    margin = load(name).head.margin
    assert margin.gradient == "straight_through" and margin.past_critical == "cos"
    CombinedMargin(**margin.to_dict())  # a valid margin
    # A command-line override still reaches the field.
    assert load(name, ["--config.head.margin.past_critical=monotone"]).head.margin.past_critical == "monotone"


def test_default_margin_is_exact_and_monotone():
    for name in ("base", "synthetic"):
        margin = load(name).head.margin
        assert margin.gradient == "exact" and margin.past_critical == "monotone"


def test_recipes_only_override_declared_fields():
    base = load("base")
    keys = lambda c, prefix="": {
        k2 for k, v in c.items() for k2 in (keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k})
    }
    for path in (ROOT / "configs").glob("*.py"):
        recipe = runpy.run_path(str(path))["get_config"]()
        assert keys(recipe) == keys(base), path.name


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("head.sample_rate", 1.5, r"config\.head\.sample_rate = 1\.5: must be in \[0\.0, 1\.0\]"),
        ("global_batch_size", 60, r"global_batch_size = 60: must be a multiple of .* 1 x 8 = 8"),
        ("model.name", "resnet9", r"model\.name = 'resnet9': must be one of .*iresnet50"),
        ("dtype", "float16", r"dtype = 'float16': must be one of float32, bfloat16"),
        ("optimizer.name", "lamb", r"optimizer\.name = 'lamb'"),
        ("optimizer.lr", 0.0, r"optimizer\.lr = 0\.0: must be in \(0\.0"),
        ("schedule.name", "exponential", r"schedule\.name"),
        ("data.image_size", 8, r"data\.image_size = 8: must be an integer >= 16"),
        ("head.margin.m2", -0.5, r"config\.head\.margin: margin m2 must be in \[0, pi\)"),
        ("head.margin.past_critical", "rising", r"config\.head\.margin: margin past_critical must be one of"),
        ("log_every_steps", 0, r"log_every_steps = 0"),
        ("head.storage_dtype", "float16", r"head\.storage_dtype = 'float16': must be one of float32, bfloat16"),
        ("head.storage_rounding", "up", r"head\.storage_rounding = 'up': must be one of nearest, stochastic"),
        ("head.block_rows", -1, r"head\.block_rows = -1: must be an integer >= 0"),
    ],
)
def test_invalid_values_name_the_field_and_fix(field, value, message):
    config = load("synthetic")
    node = config
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message) as info:
        validate(config, num_devices=8)
    expected = "head.margin.<field>" if ".margin." in field else field
    assert f"--config.{expected}=" in str(info.value)


def test_gradient_accumulation_must_divide_the_batch():
    config = load("synthetic")
    config.grad_accum_steps = 3
    with pytest.raises(ConfigError, match="grad_accum_steps x devices = 3 x 8 = 24"):
        validate(config, num_devices=8)


def test_dataset_source_with_missing_directory():
    config = load("ms1mv3_r50")
    config.data.path = "/nonexistent/ms1m"
    with pytest.raises(ConfigError, match="data.path = '/nonexistent/ms1m': no such directory"):
        validate(config, num_devices=8)


def test_run_length_checks():
    config = load("synthetic")
    with pytest.raises(ConfigError, match="warmup .* must be shorter than the run"):
        validate_run_length(config, total_steps=10, warmup_steps=10)
    config.stop_at_step = 20
    with pytest.raises(ConfigError, match="stop_at_step = 20"):
        validate_run_length(config, total_steps=10, warmup_steps=0)
    with pytest.raises(ConfigError, match="less than one step"):
        validate_run_length(config, total_steps=0, warmup_steps=0)


def test_code_never_reads_config_fields_with_fallbacks():
    pattern = re.compile(r"config(\.\w+)*\.get\(")
    for path in (ROOT / "pfc_jax").rglob("*.py"):
        assert not pattern.search(path.read_text()), f"{path}: read config fields directly"
