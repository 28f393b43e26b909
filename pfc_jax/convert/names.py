"""PyTorch state-dict names of each backbone family, and how each tensor becomes ours.

:func:`plan` lists, for a built backbone, every one of its arrays beside the PyTorch
state-dict key that holds it in the reference implementation, with the change of layout
(convolutions OIHW -> HWIO, linear layers transposed). :func:`assign` checks a state dict against that plan
(every key known, every array found, every shape right) and returns our parameters and
BatchNorm statistics.

Families and their references: iResNet and MobileFaceNet ("mbf") and ViT as insightface's
arcface_torch names them; MixFaceNets as fdbtrs/mixfacenets names them; VarGFaceNet,
whose official code is MXNet, under the PyTorch names of a direct transcription
(``head_conv``, ``stage2.0.branch1.dw``, ...). BatchNorm ``num_batches_tracked`` counters
carry nothing and are ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from flax import nnx

from pfc_jax.models.iresnet import IResNet
from pfc_jax.models.mixfacenet import MixFaceNet, MixUnit
from pfc_jax.models.mobilefacenet import ConvBN as MbfConvBN
from pfc_jax.models.mobilefacenet import DepthWise, MobileFaceNet
from pfc_jax.models.vargfacenet import DownBlock, NormalBlock, SepConv, VarGFaceNet
from pfc_jax.models.vit import VisionTransformer

Path = tuple  # keys into nnx.to_pure_dict(nnx.state(model))


class MappingError(ValueError):
    """A state dict that does not fit the backbone; the message lists what differs."""


@dataclasses.dataclass(frozen=True)
class Entry:
    path: Path | None  # where the array goes in our pure-dict state; None: a fixed unit scale
    key: str  # the PyTorch state-dict key
    transform: Callable[[np.ndarray], np.ndarray]


def _same(a):
    return a


def _conv(a):
    return np.transpose(a, (2, 3, 1, 0))  # OIHW -> HWIO


def _linear(a):
    return np.transpose(a)  # (out, in) -> (in, out)


class _Plan:
    def __init__(self):
        self.entries: list[Entry] = []

    def add(self, path, key, transform=_same):
        self.entries.append(Entry(None if path is None else tuple(path), key, transform))

    def conv(self, path, key, bias=False):
        self.add((*path, "kernel"), f"{key}.weight", _conv)
        if bias:
            self.add((*path, "bias"), f"{key}.bias")

    def linear(self, path, key, bias=True, transform=_linear):
        self.add((*path, "kernel"), f"{key}.weight", transform)
        if bias:
            self.add((*path, "bias"), f"{key}.bias")

    def bn(self, path, key, scale=True):
        # scale=False: a BatchNorm whose scale is frozen at 1 (not a parameter here); the
        # reference still stores it, and it must be 1.
        self.add((*path, "scale") if scale else None, f"{key}.weight")
        self.add((*path, "bias"), f"{key}.bias")
        self.add((*path, "mean"), f"{key}.running_mean")
        self.add((*path, "var"), f"{key}.running_var")

    def layer_norm(self, path, key):
        self.add((*path, "scale"), f"{key}.weight")
        self.add((*path, "bias"), f"{key}.bias")

    def prelu(self, path, key):
        self.add((*path, "alpha"), f"{key}.weight")


# ---- the families ---------------------------------------------------------------------


def _iresnet(m: IResNet, p: _Plan) -> None:
    p.conv(("conv1",), "conv1")
    p.bn(("bn1",), "bn1")
    p.prelu(("prelu",), "prelu")
    # arcface_torch numbers blocks within each of its four layers; ours are one list.
    layer, index = 1, 0
    for i, block in enumerate(m.blocks):
        if i and block.down_conv is not None:
            layer, index = layer + 1, 0
        t, o = f"layer{layer}.{index}", ("blocks", i)
        p.bn((*o, "bn1"), f"{t}.bn1")
        p.conv((*o, "conv1"), f"{t}.conv1")
        p.bn((*o, "bn2"), f"{t}.bn2")
        p.prelu((*o, "prelu"), f"{t}.prelu")
        p.conv((*o, "conv2"), f"{t}.conv2")
        p.bn((*o, "bn3"), f"{t}.bn3")
        if block.down_conv is not None:
            p.conv((*o, "down_conv"), f"{t}.downsample.0")
            p.bn((*o, "down_bn"), f"{t}.downsample.1")
        index += 1
    p.bn(("bn2",), "bn2")
    p.linear(("fc",), "fc")  # both flatten the last feature map in (C, H, W) order
    p.bn(("features",), "features", scale=False)


def _mbf_conv_bn(p: _Plan, path, key, layer: MbfConvBN) -> None:
    p.conv((*path, "conv"), f"{key}.layers.0")
    p.bn((*path, "bn"), f"{key}.layers.1")
    if layer.act is not None:
        p.prelu((*path, "act"), f"{key}.layers.2")


def _mobilefacenet(m: MobileFaceNet, p: _Plan) -> None:
    # arcface_torch: layers.0 ConvBlock, layers.1 ConvBlock (or residuals), then DepthWise
    # and Residual(DepthWise x n) modules; ours are one flat list.
    t = 0
    layers = list(m.layers)
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, MbfConvBN):
            _mbf_conv_bn(p, ("layers", i), f"layers.{t}", layer)
            i += 1
        elif not layer.residual:
            _mbf_depthwise(p, ("layers", i), f"layers.{t}", layer)
            i += 1
        else:
            j = 0
            while i < len(layers) and isinstance(layers[i], DepthWise) and layers[i].residual:
                _mbf_depthwise(p, ("layers", i), f"layers.{t}.layers.{j}", layers[i])
                i, j = i + 1, j + 1
        t += 1
    _mbf_conv_bn(p, ("conv_sep",), "conv_sep", m.conv_sep)
    _mbf_conv_bn(p, ("gdc",), "features.layers.0", m.gdc)
    p.linear(("linear",), "features.layers.2", bias=False)
    p.bn(("features",), "features.layers.3")


def _mbf_depthwise(p: _Plan, path, key, block: DepthWise) -> None:
    _mbf_conv_bn(p, (*path, "expand"), f"{key}.layers.0", block.expand)
    _mbf_conv_bn(p, (*path, "depthwise"), f"{key}.layers.1", block.depthwise)
    _mbf_conv_bn(p, (*path, "project"), f"{key}.layers.2", block.project)


def _vit(m: VisionTransformer, p: _Plan) -> None:
    p.conv(("patch_embed",), "patch_embed.proj", bias=True)
    p.add(("pos_embed",), "pos_embed")
    p.add(("mask_token",), "mask_token")
    for i in range(len(m.blocks)):
        o, t = ("blocks", i), f"blocks.{i}"
        p.layer_norm((*o, "norm1"), f"{t}.norm1")
        p.linear((*o, "attn", "qkv"), f"{t}.attn.qkv", bias=False)
        p.linear((*o, "attn", "proj"), f"{t}.attn.proj")
        p.layer_norm((*o, "norm2"), f"{t}.norm2")
        p.linear((*o, "fc1"), f"{t}.mlp.fc1")
        p.linear((*o, "fc2"), f"{t}.mlp.fc2")
    p.layer_norm(("norm",), "norm")
    p.linear(("feature",), "feature.0", bias=False)
    p.bn(("feature_bn",), "feature.1")
    p.linear(("embedding",), "feature.2", bias=False)
    p.bn(("embedding_bn",), "feature.3")


def _varg_conv_bn(p: _Plan, path, key: str, bn: str, act: str | None, layer) -> None:
    p.conv((*path, "conv"), key)
    p.bn((*path, "bn"), bn)
    if layer.act is not None:
        p.prelu((*path, "act"), act)


def _varg_sep(p: _Plan, path, key: str, sep: SepConv) -> None:
    _varg_conv_bn(p, (*path, "group"), f"{key}.dw", f"{key}.dw_bn", f"{key}.dw_act", sep.group)
    _varg_conv_bn(p, (*path, "point"), f"{key}.pw", f"{key}.pw_bn", f"{key}.pw_act", sep.point)


def _varg_block(p: _Plan, path, key: str, block) -> None:
    if isinstance(block, DownBlock):
        for name in ("branch1", "branch2", "sep2", "shortcut"):
            _varg_sep(p, (*path, name), f"{key}.{name}", getattr(block, name))
        p.prelu((*path, "merge_act"), f"{key}.mid_act")
    else:
        assert isinstance(block, NormalBlock)
        for name in ("sep1", "sep2") + (("shortcut",) if block.shortcut is not None else ()):
            _varg_sep(p, (*path, name), f"{key}.{name}", getattr(block, name))
        if block.se is not None:
            p.conv((*path, "se", "reduce"), f"{key}.se.conv1", bias=True)
            p.prelu((*path, "se", "act"), f"{key}.se.act1")
            p.conv((*path, "se", "expand"), f"{key}.se.conv2", bias=True)
    p.prelu((*path, "act"), f"{key}.out_act")


def _vargfacenet(m: VarGFaceNet, p: _Plan) -> None:
    _varg_conv_bn(p, ("head_conv",), "head_conv", "head_bn", "head_act", m.head_conv)
    _varg_block(p, ("head_block",), "head_block", m.head_block)
    stage, index = 1, 0
    for i, block in enumerate(m.stages):
        if isinstance(block, DownBlock):
            stage, index = stage + 1, 0
        _varg_block(p, ("stages", i), f"stage{stage}.{index}", block)
        index += 1
    _varg_conv_bn(p, ("expand",), "emb_conv", "emb_bn", "emb_act", m.expand)
    _varg_conv_bn(p, ("group",), "emb_gconv", "emb_gconv_bn", None, m.group)
    _varg_conv_bn(p, ("point",), "emb_pw", "emb_pw_bn", "emb_pw_act", m.point)
    p.linear(("fc",), "fc")
    p.bn(("features",), "fc_bn")


def _mix_convs(p: _Plan, path, key: str, convs) -> None:
    if len(convs) == 1:
        p.conv((*path, "convs", 0), f"{key}.conv")
    else:
        for j in range(len(convs)):
            p.conv((*path, "convs", j), f"{key}.conv.{j}")


def _mix_unit(p: _Plan, path, key: str, unit: MixUnit) -> None:
    if unit.expand is not None:
        _mix_convs(p, (*path, "expand"), f"{key}.exp_conv", unit.expand.convs)
        p.bn((*path, "expand_bn"), f"{key}.exp_conv.bn")
        if isinstance(unit.expand_act, nnx.Module):
            p.prelu((*path, "expand_act"), f"{key}.exp_conv.activ")
    _mix_convs(p, (*path, "depthwise"), f"{key}.conv1", unit.depthwise.convs)
    p.bn((*path, "depthwise_bn"), f"{key}.conv1.bn")
    if isinstance(unit.depthwise_act, nnx.Module):
        p.prelu((*path, "depthwise_act"), f"{key}.conv1.activ")
    if unit.se is not None:
        p.conv((*path, "se", "reduce"), f"{key}.se.conv1", bias=True)
        if isinstance(unit.se.act, nnx.Module):
            p.prelu((*path, "se", "act"), f"{key}.se.activ")
        p.conv((*path, "se", "expand"), f"{key}.se.conv2", bias=True)
    _mix_convs(p, (*path, "project"), f"{key}.conv2", unit.project.convs)
    p.bn((*path, "project_bn"), f"{key}.conv2.bn")


def _mixfacenet(m: MixFaceNet, p: _Plan) -> None:
    p.conv(("stem",), "features.init_block.conv1.conv")
    p.bn(("stem_bn",), "features.init_block.conv1.bn")
    p.prelu(("stem_act",), "features.init_block.conv1.activ")
    # The stem's residual unit: conv2.conv1 (depthwise) and conv2.conv2 (1x1).
    s, t = ("stem_unit",), "features.init_block.conv2"
    p.conv((*s, "depthwise", "convs", 0), f"{t}.conv1.conv")
    p.bn((*s, "depthwise_bn"), f"{t}.conv1.bn")
    p.prelu((*s, "depthwise_act"), f"{t}.conv1.activ")
    p.conv((*s, "project", "convs", 0), f"{t}.conv2.conv")
    p.bn((*s, "project_bn"), f"{t}.conv2.bn")
    stage, index = 0, 0
    for i, unit in enumerate(m.units):
        if i in m.stage_starts:
            stage, index = stage + 1, 0
        index += 1
        _mix_unit(p, ("units", i), f"features.stage{stage}.unit{index}", unit)
    p.conv(("tail",), "tail.conv")
    p.bn(("tail_bn",), "tail.bn")
    p.prelu(("tail_act",), "tail.activ")
    p.conv(("gdc",), "feautre_layer.dw_conv.conv")  # sic: the official module name
    p.bn(("gdc_bn",), "feautre_layer.dw_conv.bn")
    p.conv(("linear",), "feautre_layer.pw_conv.conv")
    p.bn(("features",), "features_norm", scale=False)


_FAMILIES = (
    (IResNet, _iresnet),
    (MobileFaceNet, _mobilefacenet),
    (VisionTransformer, _vit),
    (VarGFaceNet, _vargfacenet),
    (MixFaceNet, _mixfacenet),
)


def plan(model: nnx.Module) -> list[Entry]:
    """Every array of ``model`` with the PyTorch key that holds it and its layout change."""
    for cls, build in _FAMILIES:
        if isinstance(model, cls):
            p = _Plan()
            build(model, p)
            return p.entries
    raise MappingError(f"no PyTorch naming is known for {type(model).__name__}")


IGNORED_SUFFIXES = (".num_batches_tracked",)
_INVERSE = {_same: _same, _conv: lambda a: np.transpose(a, (3, 2, 0, 1)), _linear: _linear}


def state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """``model``'s arrays under the reference implementation's PyTorch names and layouts
    (the inverse of :func:`assign`; frozen BatchNorm scales as ones): what that
    implementation's ``state_dict()`` holds, ``num_batches_tracked`` aside."""
    ours = nnx.to_pure_dict(nnx.state(model))
    out = {}
    for e in plan(model):
        if e.path is None:
            width = np.shape(_get(ours, (*_sibling(e, plan(model)), "bias")))
            out[e.key] = np.ones(width, np.float32)
        else:
            out[e.key] = np.ascontiguousarray(_INVERSE[e.transform](np.asarray(_get(ours, e.path), np.float32)))
    return out


def _sibling(entry: Entry, entries: list[Entry]) -> Path:
    """Our path of the BatchNorm whose fixed scale ``entry`` is (from its bias entry)."""
    bias_key = entry.key[: -len("weight")] + "bias"
    return next(e.path[:-1] for e in entries if e.key == bias_key)


def assign(model: nnx.Module, state_dict: dict[str, np.ndarray]) -> dict:
    """Our pure-dict state of ``model`` (``nnx.to_pure_dict(nnx.state(model))``'s
    structure: parameters and BatchNorm statistics) from a PyTorch ``state_dict``.

    Raises:
      MappingError: keys the backbone does not have, keys it needs that are missing, or
        arrays of the wrong shape, all listed (the first few of each).
    """
    entries = plan(model)
    ours = nnx.to_pure_dict(nnx.state(model))
    wanted = {e.key for e in entries}
    unknown = sorted(k for k in state_dict if k not in wanted and not k.endswith(IGNORED_SUFFIXES))
    missing = sorted(k for k in wanted if k not in state_dict)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} keys this backbone does not have ({_few(unknown)})")
    if missing:
        problems.append(f"{len(missing)} keys missing ({_few(missing)})")
    out: dict = {}
    wrong = []
    for e in entries:
        if e.key not in state_dict:
            continue
        if e.path is None:
            if not np.all(np.asarray(state_dict[e.key]) == 1):
                wrong.append(f"{e.key} is not all 1 (this backbone keeps that BatchNorm scale fixed at 1)")
            continue
        target = _get(ours, e.path)
        value = np.asarray(e.transform(np.asarray(state_dict[e.key])))
        if value.shape != tuple(target.shape):
            wrong.append(f"{e.key} has shape {list(np.shape(state_dict[e.key]))} (needs {list(target.shape)} here)")
            continue
        _set(out, e.path, value.astype(np.float32))
    if wrong:
        problems.append(f"{len(wrong)} arrays that do not fit ({_few(wrong)})")
    covered = {e.path for e in entries}
    uncovered = [p for p in _paths(ours) if p not in covered]
    if uncovered:  # a plan that forgets one of our arrays is a bug of this module
        raise AssertionError(f"names.plan misses {uncovered[:3]} of {type(model).__name__}")
    if problems:
        raise MappingError("; ".join(problems))
    return out


def _few(items, n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    else:
        yield prefix
