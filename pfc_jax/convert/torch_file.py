"""Reading PyTorch checkpoint files (``torch.save``'s ``.pt`` / ``.pth``) without PyTorch.

A file written by ``torch.save`` since PyTorch 1.6 is a zip archive: one folder (named
after the file, or ``archive``) holding ``data.pkl``, a pickle of the saved object in
which every tensor is a call of ``torch._utils._rebuild_tensor_v2`` on a *persistent id*
``('storage', <storage type>, <key>, <location>, <numel>)``, and one record
``data/<key>`` per storage with its raw elements (in the byte order the ``byteorder``
record names; little-endian when absent).

:func:`load` reads such a file with a restricted unpickler: the only globals it resolves
are the tensor and parameter rebuild functions (mapped to numpy), the storage and dtype
tags, and ``collections.OrderedDict``; any other global (``os.system``, ``builtins.eval``,
...) stops the read with :class:`TorchFileError` before anything it names is called, so no
code from the file ever runs. Tensors come back as numpy arrays (float32, float16,
bfloat16 as ``jax.numpy.bfloat16``, float64 and the integer types); dicts, lists, tuples,
numbers and strings as themselves.

Not supported, each with its own error: the legacy format of PyTorch < 1.6 (a bare pickle
stream; re-save the file with a recent ``torch.save``), TorchScript archives
(``torch.jit.save``), and tensor subclasses or quantized tensors.
"""

from __future__ import annotations

import collections
import io
import math
import pathlib
import pickle
import zipfile

import numpy as np
from jax.numpy import bfloat16

from pfc_jax.errors import InputError

ZIP_MAGIC = b"PK\x03\x04"
# pickle protocol 2, LONG1 of 10 bytes: torch's legacy magic number 0x1950a86a20f9469cfc6c
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

# Storage type tags of typed storages (module ``torch``) -> element dtype.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(bfloat16),
    "DoubleStorage": np.dtype(np.float64),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# dtype objects (module ``torch``) that ``_rebuild_tensor_v3`` receives with an untyped storage.
TORCH_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(bfloat16),
    "float64": np.dtype(np.float64),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
}


class TorchFileError(InputError):
    """A file that is not a readable ``torch.save`` archive, or one that asks for more
    than tensors; the message names the file and the reason."""


class _StorageType:
    """A storage tag: the element dtype of the storage it marks (None: untyped bytes)."""

    def __init__(self, name: str, dtype: np.dtype | None):
        self.name, self.dtype = name, dtype


class _Dtype:
    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype


def _rebuild_tensor(storage, offset, size, stride, dtype=None, metadata=None) -> np.ndarray:
    if metadata:
        raise TorchFileError(
            f"a tensor with metadata {sorted(metadata)} (conjugate or negative views) is not supported"
        )
    if not isinstance(storage, np.ndarray):
        raise TorchFileError("a tensor is rebuilt from something that is not a storage")
    flat = np.asarray(storage)
    if dtype is not None:  # _rebuild_tensor_v3: an untyped storage holds bytes of ``dtype``
        if flat.nbytes % dtype.itemsize:
            raise TorchFileError(f"an untyped storage of {flat.nbytes} bytes is not a whole number of {dtype}")
        flat = flat.view(dtype)
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise TorchFileError(f"a tensor of size {size}, stride {stride}, offset {offset} is malformed")
    if 0 in size:
        return np.zeros(size, flat.dtype)
    if math.prod(size) > 4 * flat.size + (1 << 20):  # stride-0 views could ask for any size
        raise TorchFileError(f"a tensor of size {size} is far larger than its storage of {flat.size}: refused")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise TorchFileError(
            f"a tensor of size {size}, stride {stride}, offset {offset} reaches element {last} "
            f"of a storage of {flat.size}: the file is damaged"
        )
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * flat.itemsize for s in stride), writeable=False
    )
    return np.array(view)  # contiguous, owns its memory


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    return _rebuild_tensor(storage, offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, _Dtype):
        raise TorchFileError("_rebuild_tensor_v3 without a dtype")
    return _rebuild_tensor(storage, offset, size, stride, dtype=dtype.dtype, metadata=metadata)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    return data  # an nn.Parameter is its tensor here


def _allowed(module: str, name: str):
    """What a global of the file resolves to, or None when it is not allowed."""
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module == "torch._utils":
        return {
            "_rebuild_tensor_v2": _rebuild_tensor_v2,
            "_rebuild_tensor_v3": _rebuild_tensor_v3,
            "_rebuild_parameter": _rebuild_parameter,
            "_rebuild_parameter_with_state": _rebuild_parameter,
        }.get(name)
    if module == "torch" and name in STORAGE_DTYPES:
        return _StorageType(name, STORAGE_DTYPES[name])
    if (module, name) == ("torch.storage", "UntypedStorage"):
        return _StorageType(name, None)
    if module == "torch" and name in TORCH_DTYPES:
        return _Dtype(name, TORCH_DTYPES[name])
    return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream, read_record, where: str):
        super().__init__(stream)
        self._read_record, self._where, self._storages = read_record, where, {}

    def find_class(self, module, name):
        # Every way a pickle names a global (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) comes here.
        found = _allowed(module, name)
        if found is None and module == "torch" and name.startswith(("float", "complex", "bits", "qint", "quint")):
            raise TorchFileError(
                f"{self._where}: holds tensors of dtype torch.{name}, which is not read "
                f"(supported: {', '.join(TORCH_DTYPES)}); convert them with .float() before saving"
            )
        if found is None:
            raise TorchFileError(
                f"{self._where}: refused: its pickle names {module}.{name}, which is not a tensor, a "
                "storage or an OrderedDict; a checkpoint of weights needs nothing else, and nothing "
                "from this file was run (if you trust the file, re-save its state_dict with torch.save)"
            )
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFileError(f"{self._where}: unexpected persistent id {str(pid)[:80]!r}")
        _, kind, key, _location, numel = pid  # the location (cpu, cuda:3) does not matter here
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise TorchFileError(f"{self._where}: malformed storage reference {str(pid)[:80]!r}")
        if key not in self._storages:
            dtype = kind.dtype or np.dtype(np.uint8)
            raw = self._read_record(f"data/{key}")
            if len(raw) != numel * dtype.itemsize:
                raise TorchFileError(
                    f"{self._where}: storage {key} holds {len(raw)} bytes, its reference says "
                    f"{numel} x {dtype.itemsize}: the file is damaged"
                )
            self._storages[key] = np.frombuffer(raw, dtype=self._byteorder(dtype))
        return self._storages[key]

    byteorder = "little"

    def _byteorder(self, dtype: np.dtype) -> np.dtype:
        return dtype.newbyteorder("<" if self.byteorder == "little" else ">") if dtype.itemsize > 1 else dtype


def load(path: str | pathlib.Path):
    """The object a ``torch.save`` file holds, tensors as numpy arrays (see the module
    docstring). Raises :class:`TorchFileError` for a missing, damaged, legacy or
    TorchScript file and for one whose pickle names anything but tensors."""
    path = pathlib.Path(path)
    where = str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(LEGACY_MAGIC))
    except FileNotFoundError:
        raise TorchFileError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise TorchFileError(f"{where} is a directory, not a torch file") from None
    if head.startswith(LEGACY_MAGIC):
        raise TorchFileError(
            f"{where} is in the legacy format of PyTorch < 1.6, which is not read; re-save it with a "
            "recent PyTorch: torch.save(torch.load(old), new)"
        )
    if not head.startswith(ZIP_MAGIC):
        raise TorchFileError(f"{where} is not a torch.save file (not a zip archive: first bytes {head[:4]!r})")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise TorchFileError(f"{where}: a damaged zip archive ({e})") from None
    with archive:
        names = archive.namelist()
        if not names or "/" not in names[0]:
            raise TorchFileError(f"{where}: a zip archive without torch's folder layout")
        folder = names[0].split("/", 1)[0]
        present = set(names)
        if f"{folder}/constants.pkl" in present:
            raise TorchFileError(
                f"{where} is a TorchScript archive (torch.jit.save), not a state dict; save "
                "model.state_dict() with torch.save instead"
            )
        if f"{folder}/data.pkl" not in present:
            raise TorchFileError(f"{where}: a zip archive with no {folder}/data.pkl: not a torch.save file")

        def read_record(name: str) -> bytes:
            full = f"{folder}/{name}"
            if full not in present:
                raise TorchFileError(f"{where}: record {full} is missing: the file is damaged")
            try:
                return archive.read(full)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise TorchFileError(f"{where}: record {full} cannot be read ({e})") from None

        unpickler = _Unpickler(io.BytesIO(read_record("data.pkl")), read_record, where)
        if f"{folder}/byteorder" in present:
            order = read_record("byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise TorchFileError(f"{where}: unknown byte order {order!r}")
            unpickler.byteorder = order
        try:
            return unpickler.load()
        except TorchFileError as e:
            if str(e).startswith(where):
                raise
            raise TorchFileError(f"{where}: {e}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
            raise TorchFileError(f"{where}: its pickle cannot be read ({type(e).__name__}: {e})") from None


def tensors(obj, prefix: str = "") -> dict[str, np.ndarray]:
    """The arrays of a nested dict (a state dict, a checkpoint), by dotted key."""
    out = {}
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
