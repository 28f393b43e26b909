"""A small writer of PyTorch's ``torch.save`` zip format, for tests (no PyTorch needed).

It follows the format's public description: a zip of stored records under one folder,
``data.pkl`` a protocol-2 pickle in which each tensor is a ``REDUCE`` of
``torch._utils._rebuild_tensor_v2`` whose storage is a persistent id ``('storage',
torch.<Type>Storage, key, location, numel)``, and ``data/<key>`` the raw little-endian
elements. The pickle opcodes are emitted by hand, so that the file names torch's globals
without torch being importable.
"""

from __future__ import annotations

import struct
import zipfile

import numpy as np
from jax.numpy import bfloat16

STORAGE_TYPES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(bfloat16): "BFloat16Storage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class Tensor:
    """A tensor to write: a view (``offset``, ``size``, ``stride`` in elements) of the
    flat ``storage`` named ``key`` (several tensors may share one)."""

    def __init__(self, storage: np.ndarray, key: str, offset: int, size: tuple, stride: tuple):
        self.storage, self.key, self.offset, self.size, self.stride = storage, key, offset, size, stride


class Global:
    """A global the pickle names (e.g. a forbidden one, for the reader's refusal), called
    with ``args`` when given."""

    def __init__(self, module: str, name: str, args: tuple | None = None, stack: bool = False):
        self.module, self.name, self.args, self.stack = module, name, args, stack


class StateDict(dict):
    """An ``OrderedDict`` with ``_metadata``, as ``nn.Module.state_dict()`` pickles."""


class _Pickle:
    def __init__(self, location: str):
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.storages: dict[str, np.ndarray] = {}
        self.location = location

    def global_(self, module: str, name: str, stack: bool = False):
        if stack:  # protocol 4's way: two strings and STACK_GLOBAL
            self.str(module)
            self.str(name)
            self.out += b"\x93"
        else:
            self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def str(self, s: str):
        data = s.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(data)) + data

    def int(self, i: int):
        if -(2**31) <= i < 2**31:
            self.out += b"J" + struct.pack("<i", i)
        else:
            raw = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(raw)]) + raw

    def tuple(self, items):
        self.out += b"("
        for x in items:
            self.obj(x)
        self.out += b"t"

    def obj(self, x):
        if x is None:
            self.out += b"N"
        elif x is True or x is False:
            self.out += b"\x88" if x else b"\x89"
        elif isinstance(x, int):
            self.int(x)
        elif isinstance(x, float):
            self.out += b"G" + struct.pack(">d", x)
        elif isinstance(x, str):
            self.str(x)
        elif isinstance(x, tuple):
            self.tuple(x)
        elif isinstance(x, list):
            self.out += b"]("
            for v in x:
                self.obj(v)
            self.out += b"e"
        elif isinstance(x, np.ndarray):
            self.obj(
                Tensor(np.ascontiguousarray(x).reshape(-1), f"{len(self.storages)}", 0, x.shape, _strides(x.shape))
            )
        elif isinstance(x, Tensor):
            self.tensor(x)
        elif isinstance(x, Global):
            self.global_(x.module, x.name, x.stack)
            if x.args is not None:
                self.tuple(x.args)
                self.out += b"R"
        elif isinstance(x, dict):
            if isinstance(x, StateDict):
                self.global_("collections", "OrderedDict")
                self.out += b")R"  # OrderedDict()
            else:
                self.out += b"}"
            if x:
                self.out += b"("
                for k, v in x.items():
                    self.obj(k)
                    self.obj(v)
                self.out += b"u"
            if isinstance(x, StateDict):  # BUILD with {'_metadata': OrderedDict({'': {'version': 1}})}
                self.out += b"}"
                self.str("_metadata")
                self.global_("collections", "OrderedDict")
                self.out += b")R("
                self.str("")
                self.obj({"version": 1})
                self.out += b"usb"  # SETITEMS, SETITEM, BUILD
        else:
            raise TypeError(f"cannot write {type(x).__name__}")

    def tensor(self, t: Tensor):
        self.storages.setdefault(t.key, t.storage)
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("
        self.out += b"("  # the persistent id
        self.str("storage")
        self.global_("torch", STORAGE_TYPES[t.storage.dtype])
        self.str(t.key)
        self.str(self.location)
        self.int(t.storage.size)
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.int(t.offset)
        self.tuple(tuple(t.size))
        self.tuple(tuple(t.stride))
        self.out += b"\x89"  # requires_grad False
        self.global_("collections", "OrderedDict")
        self.out += b")R"  # backward hooks
        self.out += b"tR"  # TUPLE, REDUCE


def _strides(shape) -> tuple:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def save(obj, path, *, folder: str = "archive", location: str = "cuda:0") -> None:
    """Writes ``obj`` (dicts, StateDicts, lists, tuples, numbers, strings, numpy arrays,
    :class:`Tensor` views, :class:`Global` s) as ``torch.save`` would."""
    p = _Pickle(location)
    p.obj(obj)
    p.out += b"."
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{folder}/data.pkl", bytes(p.out))
        z.writestr(f"{folder}/byteorder", "little")
        for key, storage in p.storages.items():
            z.writestr(f"{folder}/data/{key}", storage.astype(storage.dtype.newbyteorder("<")).tobytes())
        z.writestr(f"{folder}/version", "3\n")
