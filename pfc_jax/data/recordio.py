"""insightface RecordIO datasets (``train.rec`` + ``train.idx`` + ``property``), no mxnet.

The container (dmlc RecordIO): each record is ``magic:u32 | lrecord:u32 | payload |
zero padding to 4 bytes``, little-endian, with ``magic = 0xced7230a`` and ``lrecord =
cflag << 29 | length``. A payload that contains the magic word at a 4-byte-aligned
offset is split there into parts (cflag 1 = first, 2 = middle, 3 = last; the magic
word itself is dropped and re-inserted on reading); cflag 0 is a whole record. The
``.idx`` file is text, one ``key<TAB>byte offset`` line per record.

The image payload (mxnet ``recordio.pack``): a 24-byte header ``flag:u32, label:f32,
id:u64, id2:u64``; if ``flag > 0`` the label is instead ``flag`` float32 values that
follow the header; then the encoded image.

insightface's dataset convention: record 0 is a header with ``flag > 0`` whose labels
``[a, b)`` say that keys ``1 .. a-1`` are images and keys ``a .. b-1`` are one record per
identity whose labels give that identity's range of image keys. Without such a header
every key is an image. ``property`` holds ``num_classes,height,width``.

    python -m pfc_jax.data.recordio index DIR     # rebuild a missing or stale train.idx
    python -m pfc_jax.data.recordio check DIR     # read every record, report the first problem
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from pfc_jax import cli
from pfc_jax.errors import InputError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
_MAX_LENGTH = (1 << 29) - 1


class RecordIOError(InputError):
    """A RecordIO file that cannot be read as it is; the message says where and what to do."""


# ---- container ------------------------------------------------------------------------


def _lrecord(cflag: int, length: int) -> bytes:
    return struct.pack("<I", (cflag << 29) | length)


def encode_record(payload: bytes) -> bytes:
    """The on-disk bytes of one record (split around aligned magic words, padded)."""
    if len(payload) > _MAX_LENGTH:
        raise ValueError(f"a RecordIO record holds at most {_MAX_LENGTH} bytes, got {len(payload)}")
    out, start = [], 0
    for i in range(0, len(payload) - len(payload) % 4, 4):
        if payload[i : i + 4] == _MAGIC_BYTES:
            out += [_MAGIC_BYTES, _lrecord(1 if start == 0 else 2, i - start), payload[start:i]]
            start = i + 4
    out += [_MAGIC_BYTES, _lrecord(3 if start else 0, len(payload) - start), payload[start:]]
    out.append(b"\0" * (-len(payload) % 4))
    return b"".join(out)


class IRHeader(NamedTuple):
    """mxnet's image record header. ``label`` is a float or a float32 array (``flag`` > 0)."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack(header: IRHeader, image: bytes = b"") -> bytes:
    """An image record payload (mxnet ``recordio.pack``)."""
    label = header.label
    if np.ndim(label) == 0:
        return _HEADER.pack(0, float(label), header.id, header.id2) + image
    label = np.asarray(label, np.float32).ravel()
    return _HEADER.pack(label.size, 0.0, header.id, header.id2) + label.tobytes() + image


def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
    """(header, image bytes) of an image record payload."""
    if len(payload) < _HEADER.size:
        raise RecordIOError(f"record payload of {len(payload)} bytes is shorter than the 24-byte image header")
    flag, label, id_, id2 = _HEADER.unpack_from(payload)
    rest = payload[_HEADER.size :]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise RecordIOError(f"image header announces {flag} labels but the record ends first")
        label = np.frombuffer(rest, np.float32, flag).copy()
        rest = rest[4 * flag :]
    return IRHeader(flag, label, id_, id2), rest


class Writer:
    """Writes ``.rec`` and ``.idx`` together. Use as a context manager."""

    def __init__(self, rec_path: str, idx_path: str):
        self._rec = open(rec_path, "wb")
        self._idx = open(idx_path, "w")

    def write(self, key: int, payload: bytes) -> None:
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        self._rec.write(encode_record(payload))

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _truncated(path: str, size: int, expected: str) -> RecordIOError:
    return RecordIOError(f"{path} is truncated at byte {size}: {expected} (re-copy or re-download the file)")


def _record_end(fd: int, offset: int) -> int | None:
    """Where the record starting at ``offset`` ends, as its part headers announce it
    (only headers are read); past the end of the file, the least it needs. None if no
    record starts at ``offset``."""
    pos = offset
    while True:
        head = os.pread(fd, 8, pos)
        if len(head) < 8:
            return pos + 8
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            return None if pos == offset else pos  # a damaged later part: read_at reports it
        length = lrec & _MAX_LENGTH
        pos += 8 + length + (-length % 4)
        if lrec >> 29 in (0, 3):
            return pos


def _check_length(fd: int, offsets: Sequence[int], rec_path: str, size: int) -> None:
    """Raises the truncation error if the indexed ``offsets`` say that ``rec_path`` (of
    ``size`` bytes) was cut short: some point at or past its end while those inside start
    records (as in a prefix of the indexed file), or the last record runs past the end.
    An index that does not fit the file otherwise is left to the stale-index check."""
    inside = sorted(o for o in offsets if o < size)
    last = max(offsets)
    if last >= size:
        if not inside or all(_record_end(fd, o) is not None for o in (inside[0], inside[-1])):
            raise _truncated(rec_path, size, f"the index expects records up to byte {last + 8}")
        return
    end = _record_end(fd, last)
    if end is not None and end > size:
        raise _truncated(rec_path, size, f"the index expects records up to byte {end}")


def read_at(fd: int, offset: int, path: str, file_size: int) -> tuple[bytes, int]:
    """Reads the record starting at ``offset`` of the open file descriptor ``fd``:
    (payload, offset of the next record). Positional reads: safe across threads."""
    parts, pos = [], offset
    while True:
        head = os.pread(fd, 8, pos)
        if len(head) < 8:
            raise _truncated(path, file_size, f"the record at offset {pos} needs bytes up to {pos + 8}")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(
                f"{path}: bad magic 0x{magic:08x} at offset {pos} (expected 0x{MAGIC:08x}): "
                "not a RecordIO file, corrupt, or read through a stale .idx"
            )
        cflag, length = lrec >> 29, lrec & _MAX_LENGTH
        if cflag > 3:
            raise RecordIOError(f"{path}: invalid continuation flag {cflag} at offset {pos}")
        padded = length + (-length % 4)
        body = os.pread(fd, padded, pos + 8)
        if len(body) < padded:
            raise _truncated(path, file_size, f"the record at offset {pos} needs bytes up to {pos + 8 + padded}")
        parts.append(body[:length])
        pos += 8 + padded
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts), pos


def scan(path: str):
    """Yields (offset, payload) of every record, in file order."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            payload, nxt = read_at(f.fileno(), pos, path, size)
            yield pos, payload
            pos = nxt


def rebuild_index(rec_path: str, idx_path: str) -> int:
    """Writes a fresh ``.idx`` by scanning ``.rec``; keys are the headers' ``id`` (as
    insightface writes them) or, if those repeat, the record's position. Returns the count."""
    size = os.path.getsize(rec_path)
    entries, announced = [], None
    for offset, payload in scan(rec_path):  # a record cut short raises here
        header = unpack(payload)[0]
        if offset == 0 and header.flag >= 2:
            announced = int(header.label[1])  # insightface's header record: keys 0 .. b-1
        entries.append((header.id, offset))
    # A file cut at a record boundary scans cleanly: the old index or the header record tells.
    old = _old_offsets(idx_path)
    if old and max(old) >= size and {o for o in old if o < size} <= {o for _, o in entries}:
        raise _truncated(rec_path, size, f"the index expects records up to byte {max(old) + 8}")
    if announced is not None and len(entries) < announced:
        raise _truncated(
            rec_path, size, f"the header record announces {announced} records, the file holds {len(entries)}"
        )
    keys = [k for k, _ in entries]
    if len(set(keys)) != len(keys):
        keys = list(range(len(entries)))
    tmp = idx_path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(f"{k}\t{offset}\n" for k, (_, offset) in zip(keys, entries))
    os.replace(tmp, idx_path)  # atomic: never a half-written index
    return len(entries)


def _old_offsets(idx_path: str) -> list[int]:
    """The offsets of an existing index, or [] if there is none or it does not parse."""
    try:
        with open(idx_path) as f:
            return [int(line.split()[1]) for line in f if line.strip()]
    except (OSError, ValueError, IndexError):
        return []


# ---- the dataset ------------------------------------------------------------------------


def _read_index(idx_path: str, rec_path: str) -> dict[int, int]:
    fix = f"rebuild it with: python -m pfc_jax.data.recordio index {os.path.dirname(rec_path) or '.'}"
    if not os.path.exists(idx_path):
        raise RecordIOError(f"{idx_path} is missing (it is the index of {rec_path}); {fix}")
    index = {}
    with open(idx_path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                key, offset = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                raise RecordIOError(f"{idx_path}:{n}: expected 'key<TAB>offset', got {line!r}; {fix}") from None
            index[key] = offset
    if not index:
        raise RecordIOError(f"{idx_path} is empty; {fix}")
    size = os.path.getsize(rec_path)
    with open(rec_path, "rb") as f:
        _check_length(f.fileno(), list(index.values()), rec_path, size)
        for key in (min(index, key=index.get), max(index, key=index.get)):
            f.seek(index[key])
            if index[key] >= size or f.read(4) != _MAGIC_BYTES:
                raise RecordIOError(
                    f"{idx_path} is stale: key {key} points at offset {index[key]}, which is not "
                    f"the start of a record in {rec_path} ({size} bytes); {fix}"
                )
    return index


class RecordIODataset:
    """Random-access source over an insightface RecordIO folder.

    ``dataset[i]`` is ``{"encoded": bytes, "label": int}`` for the i-th image (i in
    ``[0, len)``). Labels are checked against ``num_classes`` from ``property``. The file
    is opened lazily per process, so the object pickles cheaply (data-loader workers).
    """

    def __init__(self, directory: str, *, prefix: str = "train"):
        self.directory = directory
        self.rec_path = os.path.join(directory, f"{prefix}.rec")
        self.idx_path = os.path.join(directory, f"{prefix}.idx")
        if not os.path.exists(self.rec_path):
            raise RecordIOError(f"{self.rec_path} not found: is {directory} an insightface RecordIO folder?")
        self._size = os.path.getsize(self.rec_path)
        self._index = _read_index(self.idx_path, self.rec_path)
        self.num_classes, self.image_shape = self._read_property()
        self._file = None
        header, _ = self._header(0) if 0 in self._index else (None, None)
        if header is not None and header.flag > 0:
            start, end = int(header.label[0]), int(header.label[1])
            self.keys = np.arange(1, start, dtype=np.int64)
            self._identity_keys = (start, end)
        else:
            self.keys = np.asarray(sorted(self._index), dtype=np.int64)
            self._identity_keys = None
        missing = [int(k) for k in self.keys[:1].tolist() + self.keys[-1:].tolist() if int(k) not in self._index]
        if missing:
            raise RecordIOError(
                f"{self.idx_path} lacks image key {missing[0]} announced by the header record; "
                f"rebuild it with: python -m pfc_jax.data.recordio index {directory}"
            )

    def _read_property(self):
        path = os.path.join(self.directory, "property")
        if not os.path.exists(path):
            raise RecordIOError(f"{path} is missing: write 'num_classes,112,112' into it")
        try:
            num_classes, h, w = (int(x) for x in open(path).read().strip().split(","))
        except ValueError:
            raise RecordIOError(f"{path} must hold 'num_classes,height,width', got {open(path).read()!r}") from None
        return num_classes, (h, w)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def _read(self, key: int) -> bytes:
        if self._file is None:  # opened lazily, once per process (not pickled)
            self._file = open(self.rec_path, "rb")
        try:
            offset = self._index[key]
        except KeyError:
            raise RecordIOError(f"{self.idx_path} has no record with key {key}") from None
        return read_at(self._file.fileno(), offset, self.rec_path, self._size)[0]

    def _header(self, key: int):
        return unpack(self._read(key))

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"RecordIODataset({self.directory!r}, {len(self)} images, {self.num_classes} classes)"

    def label_of(self, header: IRHeader, key: int) -> int:
        label = header.label if header.flag == 0 else header.label[0]
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise RecordIOError(
                f"{self.rec_path}: record {key} has label {label}, outside [0, {self.num_classes}) "
                f"from {os.path.join(self.directory, 'property')}: the property file or the data is wrong"
            )
        return label

    def __getitem__(self, i: int) -> dict:
        key = int(self.keys[i])
        header, image = self._header(key)
        return {"encoded": image, "label": self.label_of(header, key)}

    def labels(self) -> np.ndarray:
        """int32 label of every image. With identity records, one header read per identity
        (the label of its first image covers its range); otherwise every header is read."""
        if self._identity_keys is None:
            return np.asarray([self.label_of(self._header(int(k))[0], int(k)) for k in self.keys], np.int32)
        out = np.full(len(self), -1, np.int32)
        for key in range(*self._identity_keys):
            a, b = (int(x) for x in self._header(key)[0].label[:2])
            if b > a:
                out[a - 1 : b - 1] = self.label_of(self._header(a)[0], a)
        if (out < 0).any():
            raise RecordIOError(f"{self.rec_path}: the identity records do not cover every image")
        return out


def write_dataset(
    directory: str, images: Sequence[bytes], labels: Sequence[int], num_classes: int, image_shape=(112, 112)
) -> None:
    """Writes an insightface-style folder: header record, images (keys 1..N) grouped by
    label, one record per identity, ``.idx`` and ``property``."""
    order = np.argsort(np.asarray(labels), kind="stable")
    os.makedirs(directory, exist_ok=True)
    n = len(images)
    with Writer(os.path.join(directory, "train.rec"), os.path.join(directory, "train.idx")) as w:
        w.write(0, pack(IRHeader(2, np.array([n + 1, n + 1 + num_classes], np.float32), 0, 0)))
        ranges = {}
        for key, i in enumerate(order, 1):
            label = int(labels[i])
            w.write(key, pack(IRHeader(0, float(label), key, 0), images[i]))
            first, _ = ranges.get(label, (key, key))
            ranges[label] = (first, key + 1)
        for c in range(num_classes):
            a, b = ranges.get(c, (n + 1, n + 1))
            w.write(n + 1 + c, pack(IRHeader(2, np.array([a, b], np.float32), n + 1 + c, 0)))
    with open(os.path.join(directory, "property"), "w") as f:
        f.write(f"{num_classes},{image_shape[0]},{image_shape[1]}\n")


def _parser():
    p = cli.parser("pfc_jax.data.recordio", __doc__)
    p.add_argument("command", choices=("index", "check"))
    p.add_argument("directory")
    p.add_argument("--prefix", default="train")
    return p


def _run(args) -> None:
    rec = os.path.join(args.directory, f"{args.prefix}.rec")
    if args.command == "index":
        n = rebuild_index(rec, os.path.join(args.directory, f"{args.prefix}.idx"))
        print(f"wrote {args.prefix}.idx: {n} records")
    else:
        ds = RecordIODataset(args.directory, prefix=args.prefix)
        for i in range(len(ds)):
            ds[i]
        print(f"ok: {ds!r}")


def main(argv=None) -> None:
    cli.run(_run, _parser(), argv)


if __name__ == "__main__":
    main()
