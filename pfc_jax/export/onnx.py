"""JAX backbone -> ONNX graph, by translating its jaxpr.

The backbone is traced once, in inference mode, with a symbolic batch dimension, and each
JAX operation becomes one ONNX operator (or a few). Arithmetic on weights alone (such as
BatchNorm's ``scale * rsqrt(var + eps)``) is evaluated at export time. Every value
remembers its physical axis order, so the NHWC model becomes an NCHW graph without a
transpose around each convolution; a JAX ``transpose`` costs no node at all. Values that
JAX broadcasts stay small where ONNX's elementwise operators broadcast them implicitly.
Two rewrites keep the graph in the form deployment tools expect: ``where(x >= 0, x, a * x)``
becomes ``PRelu`` and ``max(x, 0)`` becomes ``Relu``.

The operations covered are those of the backbones in :mod:`pfc_jax.models` and of the
usual vision layers (convolutions, matmuls and einsums, elementwise math, reductions,
reshapes, slices, padding, concatenation); any other raises :class:`ExportError` naming it.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import export as jax_export
from jax.extend import core

from pfc_jax.errors import InputError, RunError

INPUT, OUTPUT, BATCH = "input", "embedding", "N"
DEFAULT_OPSET, MIN_OPSET = 17, 13
NCHW = (0, 3, 1, 2)  # physical axis i of the ONNX input holds logical (NHWC) axis NCHW[i]


class ExportError(RunError):
    """A model that cannot be exported, or an export that does not match the JAX model."""


@dataclasses.dataclass
class _Tensor:
    """An ONNX value standing for a jaxpr variable.

    ``perm[i]`` is the logical (JAX) axis held by physical axis i. ``shape`` is the
    physical shape; a dimension may be 1 where the value is still to be broadcast, which
    ONNX's elementwise operators do implicitly. ``origin`` feeds small peephole rewrites.
    """

    name: str
    perm: tuple[int, ...]
    shape: tuple
    origin: tuple = ()


def _static(d) -> bool:
    return isinstance(d, (int, np.integer))


def _same_dim(a, b) -> bool:
    return _static(a) == _static(b) and a == b


def require_onnx() -> None:
    """Raises an :class:`~pfc_jax.errors.InputError` saying how to install onnx and onnxruntime if missing."""
    for name in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(name) is None:
            raise InputError(f"{name} is not installed (pip install 'pfc_jax[onnx]': onnx, onnxruntime)")


def _host_device():
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX limited to accelerators (JAX_PLATFORMS)
        return jax.devices()[0]


def _onnx_dtype(dtype) -> int:
    from onnx import helper

    try:
        return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (KeyError, TypeError, ValueError):
        raise ExportError(f"dtype {dtype} has no ONNX export here; export a float32 model") from None


class _Builder:
    """Collects nodes and initializers with unique names."""

    def __init__(self):
        self.nodes, self.initializers, self._count, self._consts = [], {}, 0, {}

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        from onnx import helper

        self._count += 1
        out = f"{op.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, array) -> str:
        from onnx import numpy_helper

        array = np.asarray(array, order="C")  # (ascontiguousarray would make scalars 1-D)
        _onnx_dtype(array.dtype)
        # Small constants (scalars, shapes) are shared by value, the others by identity.
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 16 else id(array)
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.initializers[name] = numpy_helper.from_array(array, name)
            self._consts[key] = (name, array)  # holding the array keeps its id unique
        return self._consts[key][0]

    def ints(self, values) -> str:
        return self.const(np.asarray(values, np.int64))


_BINARY = {
    "add": "Add",
    "sub": "Sub",
    "mul": "Mul",
    "div": "Div",
    "max": "Max",
    "min": "Min",
    "pow": "Pow",
    "ge": "GreaterOrEqual",
    "gt": "Greater",
    "le": "LessOrEqual",
    "lt": "Less",
    "eq": "Equal",
    "and": "And",
    "or": "Or",
    "xor": "Xor",
}
_UNARY = {
    "neg": "Neg",
    "exp": "Exp",
    "log": "Log",
    "tanh": "Tanh",
    "logistic": "Sigmoid",
    "sqrt": "Sqrt",
    "abs": "Abs",
    "sign": "Sign",
    "floor": "Floor",
    "ceil": "Ceil",
    "erf": "Erf",
    "sin": "Sin",
    "cos": "Cos",
    "not": "Not",
}
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin", "reduce_prod": "ReduceProd"}
_PASS_THROUGH = {
    "copy",
    "copy_p",
    "stop_gradient",
    "sharding_constraint",
    "optimization_barrier",
    "pvary",
    "reshard",
    "mesh_cast",
}
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")  # params holding the body of call-like primitives


class _Translator:
    """Emits ONNX nodes for the equations of a jaxpr, one primitive at a time."""

    def __init__(self, builder: _Builder, opset: int, batch, batch_source: str):
        self.b, self.opset, self.batch, self.batch_source = builder, opset, batch, batch_source
        self._batch_name = None
        self._layouts = {}

    # -- shapes and layouts ------------------------------------------------------------

    def _batch_dim(self) -> str:
        """int64 [1]: the batch size, read at run time from the input's shape."""
        if self._batch_name is None:
            shape = self.b.node("Shape", [self.batch_source])
            self._batch_name = self.b.node("Slice", [shape, self.b.ints([0]), self.b.ints([1])])
        return self._batch_name

    def _shape(self, dims, reshape: bool = False) -> str:
        """An int64 shape operand; symbolic dimensions are computed from the input."""
        dynamic = [i for i, d in enumerate(dims) if not _static(d)]
        if not dynamic:
            return self.b.ints(dims)
        if reshape and len(dynamic) == 1:  # Reshape infers one dimension from the size
            return self.b.ints([-1 if i == dynamic[0] else d for i, d in enumerate(dims)])
        parts = []
        for d in dims:
            if _static(d):
                parts.append(self.b.ints([d]))
            elif _same_dim(d, self.batch):
                parts.append(self._batch_dim())
            else:
                raise ExportError(f"dimension {d} is not the batch or a constant: not supported")
        return self.b.node("Concat", parts, axis=0)

    def _layout(self, x, perm) -> tuple[str, tuple]:
        """(name, physical shape) of ``x`` with its axes in order ``perm`` (not broadcast)."""
        if isinstance(x, np.ndarray):
            arr = np.transpose(x, perm) if x.ndim == len(perm) else x
            return self.b.const(arr), arr.shape
        perm = tuple(perm)
        if x.perm == perm:
            return x.name, x.shape
        key = (x.name, perm)
        if key not in self._layouts:
            rel = [x.perm.index(p) for p in perm]
            self._layouts[key] = self.b.node("Transpose", [x.name], perm=rel), tuple(x.shape[r] for r in rel)
        return self._layouts[key]

    def _full(self, x, aval, perm=None) -> str:
        """``x`` with its logical shape in full, axes in order ``perm`` (default: logical)."""
        perm = tuple(range(aval.ndim)) if perm is None else tuple(perm)
        shape = tuple(aval.shape)
        if isinstance(x, np.ndarray) and x.shape != shape and all(map(_static, shape)):
            x = np.broadcast_to(x, shape)
        name, have = self._layout(x, perm)
        want = tuple(shape[p] for p in perm)
        if len(have) != len(want) or not all(map(_same_dim, have, want)):
            name = self.b.node("Expand", [name, self._shape(want)])
        return name

    def _elementwise(self, op: str, xs: list, out_aval, origin: tuple = (), **attrs) -> _Tensor:
        rank = out_aval.ndim
        perm = next((x.perm for x in xs if isinstance(x, _Tensor) and len(x.perm) == rank), tuple(range(rank)))
        names, shapes = [], []
        for x in xs:  # rank 0 or the output's rank
            name, shape = (
                self._layout(x, perm)
                if np.ndim(x) == rank or len(getattr(x, "perm", ())) == rank
                else (self.b.const(x) if isinstance(x, np.ndarray) else x.name, ())
            )
            names.append(name)
            shapes.append(tuple(shape))
        out = []
        for dims in zip(*[(1,) * (rank - len(s)) + s for s in shapes]):
            out.append(next((d for d in dims if not _same_dim(d, 1)), 1))
        return _Tensor(self.b.node(op, names, **attrs), perm, tuple(out), origin)

    def _unary(self, op: str, x, **attrs) -> _Tensor:
        return _Tensor(self.b.node(op, [x.name], **attrs), x.perm, x.shape)

    def _new(self, name: str, aval) -> _Tensor:
        return _Tensor(name, tuple(range(aval.ndim)), tuple(aval.shape))

    # -- the walk ----------------------------------------------------------------------

    def run(self, jaxpr, consts, args) -> list:
        env = {}

        def read(v):
            if isinstance(v, core.Literal):
                return np.asarray(v.val, v.aval.dtype)
            return env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = np.asarray(c)
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            outs = self._equation(eqn, [read(v) for v in eqn.invars])
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    def _equation(self, eqn, ins: list) -> list:
        name = eqn.primitive.name
        body = next((eqn.params[k] for k in _CALLS if k in eqn.params), None)
        if body is not None:  # jit, custom_jvp_call, remat, ...: translate the body inline
            closed = hasattr(body, "consts")
            return self.run(body.jaxpr if closed else body, body.consts if closed else (), ins)
        if name in _PASS_THROUGH:
            return ins
        outs = [v.aval for v in eqn.outvars]
        foldable = all(isinstance(x, np.ndarray) for x in ins) and all(all(map(_static, a.shape)) for a in outs)
        if foldable and name != "broadcast_in_dim":  # weights-only arithmetic: evaluate now
            args = [np.broadcast_to(x, v.aval.shape) for x, v in zip(ins, eqn.invars)]
            with jax.default_device(_host_device()):
                out = eqn.primitive.bind(*args, **eqn.params)
            return [np.asarray(o) for o in (out if eqn.primitive.multiple_results else [out])]
        handler = getattr(self, f"_p_{name}", None)
        if name in _BINARY or name in _UNARY or name in _REDUCE:
            handler = self._p_simple
        if handler is None:
            shapes = ", ".join(str(v.aval) for v in eqn.invars)
            raise ExportError(f"JAX operation {name!r} (on {shapes}) has no ONNX translation here")
        if eqn.primitive.multiple_results:
            return handler(eqn, ins, outs)
        return [handler(eqn, ins, outs[0])]

    # -- primitives --------------------------------------------------------------------

    def _p_simple(self, eqn, ins, out):
        name = eqn.primitive.name
        if name in _UNARY:
            return self._unary(_UNARY[name], ins[0])
        if name in _REDUCE:
            # Reduce in the value's physical layout (pooling an NCHW map needs no transpose).
            axes, x = tuple(eqn.params["axes"]), ins[0]
            perm = x.perm if isinstance(x, _Tensor) else tuple(range(np.ndim(x)))
            data = self._full(x, eqn.invars[0].aval, perm)
            if not axes:
                return _Tensor(data, perm, tuple(out.shape[p] for p in perm))
            physical = [perm.index(a) for a in axes]
            if name == "reduce_sum" or self.opset >= 18:
                y = self.b.node(_REDUCE[name], [data, self.b.ints(physical)], keepdims=0)
            else:
                y = self.b.node(_REDUCE[name], [data], axes=physical, keepdims=0)
            kept = [p - sum(a < p for a in axes) for p in perm if p not in axes]
            return _Tensor(y, tuple(kept), tuple(out.shape[p] for p in kept))
        x, y = ins
        consts = [isinstance(v, np.ndarray) for v in ins]
        floating = jnp.issubdtype(out.dtype, jnp.floating)
        if name == "sub" and consts[1] and floating:  # x - c -> x + (-c): folds into a Conv's bias
            return self._elementwise("Add", [x, -y], out)
        zero = [c and ins[i].size == 1 and not ins[i].any() for i, c in enumerate(consts)]
        if name == "max" and floating and any(zero):
            return self._unary("Relu", y if zero[0] else x)
        origin = ()
        if name == "mul" and consts[0] != consts[1]:
            origin = ("scale", y if consts[0] else x, x if consts[0] else y)
        if name in ("ge", "gt") and consts[1] and not y.any():
            origin = ("positive", x)
        return self._elementwise(_BINARY[name], [x, y], out, origin)

    def _p_ne(self, eqn, ins, out):
        return self._unary("Not", self._elementwise("Equal", ins, out))

    def _p_rsqrt(self, eqn, ins, out):
        return self._unary("Reciprocal", self._unary("Sqrt", ins[0]))

    def _p_square(self, eqn, ins, out):
        return self._elementwise("Mul", [ins[0], ins[0]], out)

    def _p_integer_pow(self, eqn, ins, out):
        y = eqn.params["y"]
        if y == 2:
            return self._p_square(eqn, ins, out)
        return self._elementwise("Pow", [ins[0], np.asarray(y, out.dtype)], out)

    def _p_log1p(self, eqn, ins, out):
        return self._unary("Log", self._elementwise("Add", [ins[0], np.asarray(1, out.dtype)], out))

    def _p_expm1(self, eqn, ins, out):
        return self._elementwise("Sub", [self._unary("Exp", ins[0]), np.asarray(1, out.dtype)], out)

    def _p_erfc(self, eqn, ins, out):
        return self._elementwise("Sub", [np.asarray(1, out.dtype), self._unary("Erf", ins[0])], out)

    def _p_convert_element_type(self, eqn, ins, out):
        if np.dtype(eqn.invars[0].aval.dtype) == np.dtype(out.dtype):
            return ins[0]
        return self._unary("Cast", ins[0], to=_onnx_dtype(out.dtype))

    def _p_reduce_precision(self, eqn, ins, out):
        info = jnp.finfo(out.dtype)
        if eqn.params["exponent_bits"] >= info.nexp and eqn.params["mantissa_bits"] >= info.nmant:
            return ins[0]
        raise ExportError("reduce_precision to fewer bits than the dtype has is not supported")

    def _p_clamp(self, eqn, ins, out):
        lo, x, hi = ins
        return self._elementwise("Min", [self._elementwise("Max", [x, lo], out), hi], out)

    def _p_select_n(self, eqn, ins, out):
        pred, *cases = ins
        if len(cases) != 2:
            raise ExportError("select_n with more than two cases is not supported")
        false, true = cases
        # where(x >= 0, x, alpha * x), the way the backbones write PReLU, as ONNX's PRelu.
        if (
            isinstance(pred, _Tensor)
            and isinstance(false, _Tensor)
            and pred.origin[:1] == ("positive",)
            and pred.origin[1] is true
            and false.origin[:2] == ("scale", true)
            and false.origin[2].ndim in (0, len(true.perm))
        ):
            slope, _ = self._layout(false.origin[2], true.perm)
            return _Tensor(self.b.node("PRelu", [true.name, slope]), true.perm, true.shape)
        if eqn.invars[0].aval.dtype != np.bool_:
            pred = (
                self._unary("Cast", pred, to=_onnx_dtype(np.bool_)) if isinstance(pred, _Tensor) else pred.astype(bool)
            )
        return self._elementwise("Where", [pred, true, false], out)

    def _p_broadcast_in_dim(self, eqn, ins, out):
        if len(ins) != 1:
            raise ExportError("broadcast_in_dim with a dynamic shape operand is not supported")
        x, dims = ins[0], eqn.params["broadcast_dimensions"]
        in_shape = np.shape(x) if isinstance(x, np.ndarray) else None
        new_axes = [j for j in range(out.ndim) if j not in dims]
        if isinstance(x, np.ndarray):  # stays a constant: consumers broadcast it
            return x.reshape([in_shape[dims.index(j)] if j in dims else 1 for j in range(out.ndim)])
        name, shape = self._layout(x, tuple(range(len(x.perm))))
        if new_axes:
            name = self.b.node("Unsqueeze", [name, self.b.ints(new_axes)])
        return _Tensor(
            name, tuple(range(out.ndim)), tuple(shape[dims.index(j)] if j in dims else 1 for j in range(out.ndim))
        )

    def _p_reshape(self, eqn, ins, out):
        if eqn.params.get("dimensions") not in (None, ()):
            raise ExportError("reshape with a dimension permutation is not supported")
        in_aval = eqn.invars[0].aval
        name = self._full(ins[0], in_aval)
        if len(in_aval.shape) == len(out.shape) and all(map(_same_dim, in_aval.shape, out.shape)):
            return self._new(name, out)
        return self._new(self.b.node("Reshape", [name, self._shape(out.shape, reshape=True)]), out)

    def _p_squeeze(self, eqn, ins, out):
        # Size-1 axes dropped: a reshape to the output's shape (``dimensions`` names the axes).
        name = self._full(ins[0], eqn.invars[0].aval)
        return self._new(self.b.node("Reshape", [name, self._shape(out.shape, reshape=True)]), out)

    def _p_split(self, eqn, ins, outs):
        # One Slice per piece, in the value's physical layout (a channel split of an NCHW
        # map needs no transpose).
        x, axis = ins[0], eqn.params["axis"]
        physical = x.perm.index(axis)
        pieces, start = [], 0
        for size in eqn.params["sizes"]:
            ends = [self.b.ints([start]), self.b.ints([start + size]), self.b.ints([physical])]
            shape = list(x.shape)
            shape[physical] = size
            pieces.append(_Tensor(self.b.node("Slice", [x.name, *ends]), x.perm, tuple(shape)))
            start += size
        return pieces

    def _p_transpose(self, eqn, ins, out):
        # No node: the value's physical layout stays, its logical axes are renamed.
        x, inverse = ins[0], np.argsort(eqn.params["permutation"])
        return _Tensor(x.name, tuple(int(inverse[p]) for p in x.perm), x.shape)

    def _p_conv_general_dilated(self, eqn, ins, out):
        p = eqn.params
        dn = p["dimension_numbers"]
        if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
            raise ExportError("transposed or batch-grouped convolutions are not supported")
        if any(lo < 0 or hi < 0 for lo, hi in p["padding"]):
            raise ExportError("convolutions with negative padding are not supported")
        # ONNX wants [N, C, spatial...] and [O, I, spatial...]: exactly the specs' orders.
        x = self._full(ins[0], eqn.invars[0].aval, dn.lhs_spec)
        w_aval = eqn.invars[1].aval
        w = self._full(ins[1], w_aval, dn.rhs_spec)
        y = self.b.node(
            "Conv",
            [x, w],
            kernel_shape=[w_aval.shape[a] for a in dn.rhs_spec[2:]],
            strides=list(p["window_strides"]),
            pads=[lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]],
            dilations=list(p["rhs_dilation"]),
            group=p["feature_group_count"],
        )
        return _Tensor(y, tuple(dn.out_spec), tuple(out.shape[a] for a in dn.out_spec))

    def _p_dot_general(self, eqn, ins, out):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = (v.aval for v in eqn.invars)
        if not lb and len(lc) == 1 and lc[0] == lhs.ndim - 1 and rhs.ndim == 2:  # x @ W or x @ W.T
            x = self._full(ins[0], lhs)
            w = self._full(ins[1], rhs, (rc[0], 1 - rc[0]))
            return self._new(self.b.node("MatMul", [x, w]), out)
        letters = iter("abcdefghijklmnopqrstuvwxyz")
        left = [next(letters) for _ in range(lhs.ndim)]
        right = [next(letters) for _ in range(rhs.ndim)]
        for i, j in zip((*lc, *lb), (*rc, *rb)):
            right[j] = left[i]
        result = [left[i] for i in lb]
        result += [left[i] for i in range(lhs.ndim) if i not in lc and i not in lb]
        result += [right[j] for j in range(rhs.ndim) if j not in rc and j not in rb]
        equation = f"{''.join(left)},{''.join(right)}->{''.join(result)}"
        x, w = self._full(ins[0], lhs), self._full(ins[1], rhs)
        return self._new(self.b.node("Einsum", [x, w], equation=equation), out)

    def _p_argmax(self, eqn, ins, out, op="ArgMax"):
        x = self._full(ins[0], eqn.invars[0].aval)
        y = self.b.node(op, [x], axis=int(eqn.params["axes"][0]), keepdims=0)
        return self._new(self.b.node("Cast", [y], to=_onnx_dtype(out.dtype)), out)

    def _p_argmin(self, eqn, ins, out):
        return self._p_argmax(eqn, ins, out, op="ArgMin")

    def _p_slice(self, eqn, ins, out):
        p, aval = eqn.params, eqn.invars[0].aval
        x = self._full(ins[0], aval)
        axes = list(range(aval.ndim))
        steps = list(p["strides"] or [1] * aval.ndim)
        args = [
            x,
            self.b.ints(p["start_indices"]),
            self._shape(p["limit_indices"]),
            self.b.ints(axes),
            self.b.ints(steps),
        ]
        return self._new(self.b.node("Slice", args), out)

    def _p_rev(self, eqn, ins, out):
        axes = list(eqn.params["dimensions"])
        x = self._full(ins[0], eqn.invars[0].aval)
        n = len(axes)
        args = [x, self.b.ints([-1] * n), self.b.ints([-(2**63)] * n), self.b.ints(axes), self.b.ints([-1] * n)]
        return self._new(self.b.node("Slice", args), out)

    def _p_concatenate(self, eqn, ins, out):
        names = [self._full(x, v.aval) for x, v in zip(ins, eqn.invars)]
        return self._new(self.b.node("Concat", names, axis=int(eqn.params["dimension"])), out)

    def _p_pad(self, eqn, ins, out):
        config = eqn.params["padding_config"]
        if any(lo < 0 or hi < 0 or interior for lo, hi, interior in config):
            raise ExportError("pad with negative or interior padding is not supported")
        x = self._full(ins[0], eqn.invars[0].aval)
        value = self._full(ins[1], eqn.invars[1].aval)
        pads = self.b.ints([lo for lo, _, _ in config] + [hi for _, hi, _ in config])
        return self._new(self.b.node("Pad", [x, pads, value]), out)

    def _p_gather(self, eqn, ins, out):
        # With a symbolic batch, jnp turns static indexing (x[:, 0], x[:, 1:-1], x[:, ::2])
        # into gathers of constant indices. The indexed axes are flattened into one and the
        # element each output reads is computed here: one ONNX Gather of constant indices.
        x, indices = ins
        dn, sizes, aval = eqn.params["dimension_numbers"], eqn.params["slice_sizes"], eqn.invars[0].aval
        if not isinstance(indices, np.ndarray) or dn.operand_batching_dims:
            raise ExportError("gather with computed indices is not supported (constant indexing is)")
        mapped, collapsed = tuple(dn.start_index_map), tuple(dn.collapsed_slice_dims)
        passing = [
            a for a in range(aval.ndim) if a not in mapped and a not in collapsed and _same_dim(sizes[a], aval.shape[a])
        ]
        gathered = [a for a in range(aval.ndim) if a not in passing]
        if not gathered or not all(_static(aval.shape[a]) for a in gathered):
            raise ExportError("gather along the batch dimension is not supported")
        batch = indices.shape[:-1]
        starts = [np.zeros(batch, np.int64) for _ in gathered]
        for k, a in enumerate(mapped):  # slice starts are clamped into range, as XLA does
            raw = indices[..., k].astype(np.int64)
            starts[gathered.index(a)] = np.clip(raw, 0, aval.shape[a] - sizes[a])
            if "FILL" in str(eqn.params["mode"]) and np.any(raw != starts[gathered.index(a)]):
                raise ExportError("gather with out-of-bounds indices in fill mode is not supported")
        offsets = np.meshgrid(*[np.arange(sizes[a]) for a in gathered], indexing="ij")
        ones = (1,) * len(gathered)
        positions = [s.reshape(batch + ones) + o for s, o in zip(starts, offsets)]
        window = [a for a in gathered if a not in collapsed]
        flat = np.ravel_multi_index(positions, [aval.shape[a] for a in gathered])
        flat = flat.reshape(batch + tuple(sizes[a] for a in window))
        data = self._full(x, aval, passing + gathered)
        data = self.b.node("Reshape", [data, self.b.ints([0] * len(passing) + [-1])])  # 0: keep that dim
        y = self.b.node("Gather", [data, self.b.const(flat)], axis=len(passing))
        # Physical axes: passing, index batch, window; JAX puts the kept operand axes at
        # offset_dims (in operand order) and the index batch axes in the other places.
        kept = dict(zip([a for a in range(aval.ndim) if a not in collapsed], dn.offset_dims))
        batch_axes = [j for j in range(out.ndim) if j not in dn.offset_dims]
        perm = [kept[a] for a in passing] + batch_axes + [kept[a] for a in window]
        shape = [aval.shape[a] for a in passing] + list(batch) + [sizes[a] for a in window]
        return _Tensor(y, tuple(perm), tuple(shape))


def to_onnx(model: nnx.Module, *, image_size: int, opset: int = DEFAULT_OPSET, metadata: dict | None = None):
    """The ONNX model (``onnx.ModelProto``) of ``model(x, train=False)`` for NCHW input.

    Raises :class:`ExportError` for an operation without a translation.
    """
    import onnx
    from onnx import helper

    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"opset {opset} is outside the supported {MIN_OPSET}..{onnx.defs.onnx_opset_version()}")
    (batch,) = jax_export.symbolic_shape(BATCH)
    spec = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    try:
        closed = jax.make_jaxpr(lambda x: model(x, train=False))(spec)
    except Exception as e:  # noqa: BLE001 - tracing errors come in many types
        raise ExportError(f"cannot trace the backbone with a symbolic batch size: {e}") from e
    out_aval = closed.jaxpr.outvars[0].aval
    if len(closed.jaxpr.outvars) != 1 or out_aval.ndim != 2:
        raise ExportError(f"the backbone must return one [N, D] array, got {closed.out_avals}")

    builder = _Builder()
    translator = _Translator(builder, opset, batch, INPUT)
    x = _Tensor(INPUT, NCHW, (batch, 3, image_size, image_size))
    (result,) = translator.run(closed.jaxpr, closed.consts, [x])
    if np.dtype(out_aval.dtype) != np.float32:  # e.g. a bfloat16 backbone: the output stays float32
        if isinstance(result, _Tensor):
            result = translator._unary("Cast", result, to=onnx.TensorProto.FLOAT)
        else:
            result = result.astype(np.float32)
    name = translator._full(result, out_aval)

    # Keep what the output depends on, and give the last node the output's name.
    needed, nodes = {name}, []
    for node in reversed(builder.nodes):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(node.input)
    nodes.reverse()
    if nodes and nodes[-1].output[0] == name:
        for node in nodes:
            node.input[:] = [OUTPUT if i == name else i for i in node.input]
        nodes[-1].output[0] = OUTPUT
    else:
        nodes.append(helper.make_node("Identity", [name], [OUTPUT]))
    graph = helper.make_graph(
        nodes,
        "backbone",
        [helper.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT, [BATCH, 3, image_size, image_size])],
        [helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, [BATCH, int(out_aval.shape[1])])],
        initializer=[t for n, t in builder.initializers.items() if n in needed],
    )
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(
        graph, opset_imports=opsets, producer_name="pfc_jax", ir_version=helper.find_min_ir_version_for(opsets)
    )
    proto.doc_string = (
        "Face embedding backbone. Input: float32 [N, 3, H, W], RGB, (pixel - 127.5) / 127.5. "
        "Output: float32 [N, D] embeddings, not L2-normalized."
    )
    helper.set_model_props(proto, {k: str(v) for k, v in (metadata or {}).items()})
    return proto
