"""Data: RecordIO byte format, corruption errors, synthetic writer, TFDS build, grain pipeline."""

import hashlib
import os
import pickle
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pfc_jax.data import pipeline, recordio, synth, tfds_builder
from pfc_jax.data.augment import Augment, decode
from pfc_jax.data.recordio import RecordIODataset, RecordIOError
from pfc_jax.data.sources import ImageFolder, SourceError, TFDSDataset
from pfc_jax.data.synthetic import SyntheticIdentities
from pfc_jax.errors import InputError
from tests.cli_helpers import exits_with

MAGIC = struct.pack("<I", 0xCED7230A)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    synth.write(str(out), identities=12, images_per_id=5, image_size=32, pairs=20, holdout_identities=6, progress=False)
    return out


# ---- the RecordIO format, byte by byte ----------------------------------------------------


def test_hand_assembled_records_match_the_published_format(tmp_path):
    # A whole record: magic, lrecord = (cflag 0 << 29) | 5, 5 bytes, 3 zero bytes of padding.
    whole = MAGIC + struct.pack("<I", 5) + b"hello" + b"\0\0\0"
    assert recordio.encode_record(b"hello") == whole
    # A payload holding the magic word at an aligned offset (8) is split there; the magic
    # is dropped from the parts and restored on reading.
    payload = b"ABCDEFGH" + MAGIC + b"xyz"
    split = (
        MAGIC
        + struct.pack("<I", (1 << 29) | 8)
        + b"ABCDEFGH"
        + MAGIC
        + struct.pack("<I", (3 << 29) | 3)
        + b"xyz"
        + b"\0"
    )
    assert recordio.encode_record(payload) == split
    # An image payload: '<IfQQ' header (flag, label, id, id2), then the image bytes.
    image_payload = struct.pack("<IfQQ", 0, 3.0, 7, 0) + b"\xff\xd8jpeg"
    assert recordio.pack(recordio.IRHeader(0, 3.0, 7, 0), b"\xff\xd8jpeg") == image_payload
    multi = struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 5.0, 9.0) + b"img"
    assert recordio.pack(recordio.IRHeader(2, np.array([5.0, 9.0]), 0, 0), b"img") == multi

    rec = whole + split + recordio.encode_record(image_payload) + recordio.encode_record(multi)
    (tmp_path / "train.rec").write_bytes(rec)
    # The image record: 8-byte head + 30-byte payload padded to 32.
    offsets = [0, len(whole), len(whole) + len(split), len(whole) + len(split) + 8 + 32]
    assert [o for o, _ in recordio.scan(str(tmp_path / "train.rec"))] == offsets
    assert [p for _, p in recordio.scan(str(tmp_path / "train.rec"))][:2] == [b"hello", payload]
    header, image = recordio.unpack(image_payload)
    assert header == (0, 3.0, 7, 0) and image == b"\xff\xd8jpeg"
    header, image = recordio.unpack(multi)
    assert header.flag == 2 and header.label.tolist() == [5.0, 9.0] and image == b"img"


def test_writer_reader_round_trip_with_insightface_conventions(tmp_path):
    rng = np.random.default_rng(0)
    images = [bytes(rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8)) for _ in range(9)]
    images[3] = b"\x00" * 4 + MAGIC + b"tail"  # forces a split record
    labels = [2, 0, 1, 2, 0, 1, 2, 0, 1]
    recordio.write_dataset(str(tmp_path), images, labels, num_classes=3, image_shape=(112, 112))
    ds = RecordIODataset(str(tmp_path))
    assert len(ds) == 9 and ds.num_classes == 3 and ds.image_shape == (112, 112)
    header, _ = recordio.unpack(ds._read(0))  # header record: keys [1, 10) are images
    assert header.flag == 2 and header.label.tolist() == [10.0, 13.0]
    got = sorted((ds[i]["label"], ds[i]["encoded"]) for i in range(9))
    assert got == sorted(zip(labels, images))
    np.testing.assert_array_equal(ds.labels(), [ds[i]["label"] for i in range(9)])
    assert ds.labels().tolist() == sorted(labels)  # written grouped by identity


def test_dataset_without_header_record_and_multi_float_labels(tmp_path):
    # Record 0 has a scalar label (flag 0), so it is an image, not insightface's header;
    # the others carry multi-float labels whose first value is the class.
    with recordio.Writer(str(tmp_path / "train.rec"), str(tmp_path / "train.idx")) as w:
        w.write(0, recordio.pack(recordio.IRHeader(0, 0.0, 0, 0), b"img0"))
        for key in range(1, 4):
            w.write(key, recordio.pack(recordio.IRHeader(2, np.array([key % 2, 7.0]), key, 0), b"img%d" % key))
    (tmp_path / "property").write_text("2,112,112\n")
    ds = RecordIODataset(str(tmp_path))
    assert len(ds) == 4
    assert [ds[i]["label"] for i in range(4)] == [0, 1, 0, 1]
    assert ds[2]["encoded"] == b"img2"
    assert ds.labels().tolist() == [0, 1, 0, 1]


# ---- corruption: every case has its error -------------------------------------------------


def corrupt_copy(src, dst):
    shutil.copytree(src, dst)
    return dst, RecordIODataset(str(src))


def test_bad_magic_names_file_and_offset(synth_dir, tmp_path):
    d, good = corrupt_copy(synth_dir, tmp_path / "d")
    offset = good._index[5]
    with open(d / "train.rec", "r+b") as f:
        f.seek(offset)
        f.write(b"\xde\xad\xbe\xef")
    ds = RecordIODataset(str(d))
    with pytest.raises(RecordIOError, match=rf"train.rec: bad magic 0xefbeadde at offset {offset}"):
        ds[4]


def truncate(path, by: int) -> int:
    size = os.path.getsize(path) - by
    with open(path, "r+b") as f:
        f.truncate(size)
    return size


def test_truncated_file_is_reported_as_truncated_not_stale(synth_dir, tmp_path):
    d, good = corrupt_copy(synth_dir, tmp_path / "d")
    size = truncate(d / "train.rec", 3000)  # as `truncate -s -3000 train.rec`: later offsets point past the end
    message = rf"train.rec is truncated at byte {size}: the index expects records up to byte \d+ \(re-copy"
    with pytest.raises(RecordIOError, match=message):
        RecordIODataset(str(d))
    idx = (d / "train.idx").read_bytes()
    with pytest.raises(RecordIOError, match=rf"train.rec is truncated at byte {size}"):
        recordio.rebuild_index(str(d / "train.rec"), str(d / "train.idx"))
    assert (d / "train.idx").read_bytes() == idx and not os.path.exists(d / "train.idx.tmp")


def test_truncated_last_record(synth_dir, tmp_path):
    d, good = corrupt_copy(synth_dir, tmp_path / "d")
    full = os.path.getsize(d / "train.rec")
    size = truncate(d / "train.rec", 8)  # every offset is inside the file; the last record is not
    with pytest.raises(RecordIOError, match=rf"truncated at byte {size}: the index expects records up to byte {full} "):
        RecordIODataset(str(d))


def test_truncated_at_a_record_boundary_gives_no_partial_index(synth_dir, tmp_path):
    d, good = corrupt_copy(synth_dir, tmp_path / "d")
    last = max(good._index.values())
    with open(d / "train.rec", "r+b") as f:
        f.truncate(last)  # the file now ends cleanly after the previous record
    idx = (d / "train.idx").read_bytes()
    with pytest.raises(RecordIOError, match=rf"truncated at byte {last}: the index expects"):
        recordio.rebuild_index(str(d / "train.rec"), str(d / "train.idx"))
    assert (d / "train.idx").read_bytes() == idx
    os.remove(d / "train.idx")  # without the old index, the header record still tells
    with pytest.raises(RecordIOError, match=rf"truncated at byte {last}: the header record announces"):
        recordio.rebuild_index(str(d / "train.rec"), str(d / "train.idx"))
    assert not os.path.exists(d / "train.idx") and not os.path.exists(d / "train.idx.tmp")


def test_check_and_index_commands_report_a_truncated_file(synth_dir, tmp_path, capsys):
    d, _ = corrupt_copy(synth_dir, tmp_path / "d")
    size = truncate(d / "train.rec", 4000)
    for command in ("check", "index"):
        with exits_with(capsys, rf"^error: \S*train.rec is truncated at byte {size}: .*\(re-copy or re-download"):
            recordio.main([command, str(d)])


def test_missing_and_stale_index_offer_a_rebuild(synth_dir, tmp_path):
    d, good = corrupt_copy(synth_dir, tmp_path / "d")
    os.remove(d / "train.idx")
    with pytest.raises(RecordIOError, match=r"train.idx is missing.*python -m pfc_jax.data.recordio index"):
        RecordIODataset(str(d))
    out = subprocess.run(
        [sys.executable, "-m", "pfc_jax.data.recordio", "index", str(d)], capture_output=True, text=True
    )
    assert out.returncode == 0 and "records" in out.stdout
    rebuilt = RecordIODataset(str(d))
    assert rebuilt._index == good._index
    # Stale: an index from another file.
    good_lines = (d / "train.idx").read_text().splitlines()
    lines = list(good_lines)
    key, offset = lines[-1].split("\t")
    lines[-1] = f"{key}\t{int(offset) + 4}"
    (d / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=r"train.idx is stale.*index"):
        RecordIODataset(str(d))
    # Stale: the index of another, longer file (its offsets inside this one are not records).
    size = os.path.getsize(d / "train.rec")
    lines = [f"{k}\t{int(o) + 4}" for k, o in (line.split("\t") for line in good_lines)] + [f"999\t{size + 100}"]
    (d / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=r"train.idx is stale.*index"):
        RecordIODataset(str(d))


def test_label_out_of_range_and_bad_property(synth_dir, tmp_path):
    d, _ = corrupt_copy(synth_dir, tmp_path / "d")
    (d / "property").write_text("5,32,32\n")
    ds = RecordIODataset(str(d))
    with pytest.raises(RecordIOError, match=r"label 5, outside \[0, 5\).*property"):
        [ds[i] for i in range(len(ds))]
    (d / "property").write_text("garbage")
    with pytest.raises(RecordIOError, match="num_classes,height,width"):
        RecordIODataset(str(d))
    os.remove(d / "property")
    with pytest.raises(RecordIOError, match="property is missing"):
        RecordIODataset(str(d))
    out = subprocess.run(
        [sys.executable, "-m", "pfc_jax.data.recordio", "check", str(d)], capture_output=True, text=True
    )
    assert out.returncode == 2 and "property is missing" in out.stderr


# ---- synthetic writer ----------------------------------------------------------------------


def test_synth_writer_cli(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pfc_jax.data.synth",
            "--out",
            str(tmp_path / "s"),
            "--identities",
            "4",
            "--images-per-id",
            "3",
            "--image-size",
            "32",
            "--pairs",
            "10",
            "--holdout-identities",
            "3",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    ds = RecordIODataset(str(tmp_path / "s"))
    assert len(ds) == 12 and ds.num_classes == 4
    source = SyntheticIdentities(4, 3, image_size=32)
    decoded = decode(ds[0], 32).astype(int)
    errors = [np.abs(decoded - source[j]["image"].astype(int)).mean() for j in range(len(source))]
    assert np.argmin(errors) == 0 and errors[0] < 8  # JPEG q95 of the same (noisy) image
    bins, issame = pickle.load(open(tmp_path / "s" / "synth_val.bin", "rb"), encoding="bytes")
    assert len(bins) == 20 and issame == [True, False] * 5
    assert all(b[:2] == b"\xff\xd8" for b in bins)
    train_hashes = {hashlib.md5(ds[i]["encoded"]).hexdigest() for i in range(len(ds))}
    assert not train_hashes & {hashlib.md5(b).hexdigest() for b in bins}
    assert not os.path.exists(str(tmp_path / "s") + ".incomplete")


SMALL = ["--identities", "2", "--images-per-id", "2", "--image-size", "16", "--pairs", "0"]


def test_synth_refuses_a_non_empty_out_folder_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with exits_with(capsys, rf"^error: {out} exists and is not empty \(choose another --out, or pass --overwrite"):
        synth.main(["--out", str(out), *SMALL])
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert not os.path.exists(str(out) + ".incomplete")
    with pytest.raises(InputError, match="exists and is not empty"):
        synth.write(str(out), identities=2, images_per_id=2, image_size=16, pairs=0, progress=False)
    assert os.listdir(out) == ["notes.txt"]
    synth.main(["--out", str(out), "--overwrite", *SMALL])
    assert sorted(os.listdir(out)) == ["property", "train.idx", "train.rec"]
    assert len(RecordIODataset(str(out))) == 4


def test_synth_writes_into_an_empty_existing_folder(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    synth.main(["--out", str(out), *SMALL])
    assert len(RecordIODataset(str(out))) == 4 and "wrote" in capsys.readouterr().out


# ---- TFDS (ArrayRecord, no TensorFlow) ---------------------------------------------------


def test_tfds_build_data_source_and_batches(synth_dir, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pfc_jax.data.prepare",
            "--source",
            f"rec:{synth_dir}",
            "--name",
            "synth_faces",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ds = TFDSDataset(str(tmp_path), "synth_faces")
    rec = RecordIODataset(str(synth_dir))
    assert len(ds) == len(rec) == 60 and ds.num_classes == 12
    key = lambda e: (e["label"], hashlib.md5(e["encoded"]).hexdigest())
    assert sorted(key(ds[i]) for i in range(len(ds))) == sorted(key(rec[i]) for i in range(len(rec)))
    it = pipeline.make_iterator(ds, global_batch=8, seed=0, image_size=32, threads=2)
    images, labels = next(it)
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and ((labels >= 0) & (labels < 12)).all()


def test_interrupted_tfds_build_never_loads(synth_dir, tmp_path):
    class Failing:
        num_classes = 12

        def __init__(self):
            self.inner = RecordIODataset(str(synth_dir))

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            if i == 30:
                raise KeyboardInterrupt  # the build dies half way
            return self.inner[i]

    with pytest.raises(KeyboardInterrupt):
        tfds_builder.build(Failing(), "half_built", str(tmp_path))
    with pytest.raises(SourceError, match="no complete TFDS dataset 'half_built'.*prepare"):
        TFDSDataset(str(tmp_path), "half_built")


def test_image_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    for person, n in (("bob", 2), ("alice", 3)):
        os.makedirs(tmp_path / person)
        for i in range(n):
            im = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            im.save(tmp_path / person / f"{i}.{'png' if i % 2 else 'jpg'}")
    (tmp_path / "bob" / "notes.txt").write_text("not an image")
    ds = ImageFolder(str(tmp_path))
    assert len(ds) == 5 and ds.num_classes == 2
    assert ds.labels().tolist() == [0, 0, 0, 1, 1]  # alice, then bob
    assert decode(ds[3], 32).shape == (32, 32, 3)
    with pytest.raises(SourceError, match="no identity sub-folders"):
        ImageFolder(str(tmp_path / "alice"))


# ---- the grain pipeline ---------------------------------------------------------------------


class Indexed:
    """Example i has label i: the batches reveal exactly which examples they hold."""

    def __init__(self, n):
        self.n, self.num_classes = n, n

    def __len__(self):
        return self.n

    def __repr__(self):
        return f"Indexed({self.n})"

    def __getitem__(self, i):
        return {"image": np.zeros((16, 16, 3), np.uint8), "label": int(i)}

    def labels(self):
        return np.arange(self.n, dtype=np.int32) // 4  # 4 images per "identity"


def batches(it, n):
    return [next(it)[1].tolist() for _ in range(n)]


def test_two_processes_are_disjoint_and_cover_each_epoch():
    n, batch = 48, 8  # 6 global batches per epoch
    make = lambda p: pipeline.make_iterator(
        Indexed(n), global_batch=batch, seed=3, image_size=16, process_index=p, process_count=2, threads=2
    )
    p0, p1 = batches(make(0), 12), batches(make(1), 12)
    for epoch in (0, 1):
        seen = [x for b in range(6 * epoch, 6 * epoch + 6) for x in p0[b] + p1[b]]
        assert sorted(seen) == list(range(n))
    epoch0 = [x for b in range(6) for x in p0[b] + p1[b]]
    epoch1 = [x for b in range(6, 12) for x in p0[b] + p1[b]]
    assert epoch0 != epoch1  # a new permutation every epoch
    single = batches(pipeline.make_iterator(Indexed(n), global_batch=batch, seed=3, image_size=16), 12)
    assert single == [a + b for a, b in zip(p0, p1)]


def test_state_restore_continues_the_exact_order_and_threads_do_not_matter():
    make = lambda **kw: pipeline.make_iterator(Indexed(40), global_batch=8, seed=1, image_size=16, **kw)
    it = make(threads=1)
    batches(it, 3)
    state = it.state()
    expected = batches(it, 7)
    resumed = make(threads=4)
    resumed.restore(state)
    assert batches(resumed, 7) == expected
    other = pipeline.make_iterator(Indexed(40), global_batch=8, seed=2, image_size=16)
    with pytest.raises(ValueError, match="seed=1.*this run has seed=2"):
        other.restore(state)


def test_worker_processes_give_the_same_batches():
    source = SyntheticIdentities(6, 4, image_size=16)
    make = lambda w: pipeline.make_iterator(
        source, global_batch=8, seed=0, image_size=16, workers=w, augment=Augment(flip=0.5, blur=0.5, color_jitter=0.5)
    )
    a, b = make(0), make(1)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)
    b.close()


def test_identity_balanced_batches():
    it = pipeline.make_iterator(
        Indexed(64), global_batch=8, seed=0, image_size=16, sampler="identity_balanced", images_per_identity=4
    )
    for labels in batches(it, 5):
        identities = [x // 4 for x in labels]
        assert identities[:4] == [identities[0]] * 4 and identities[4:] == [identities[4]] * 4
        assert identities[0] != identities[4]
    with pytest.raises(ValueError, match="need 8 identities per batch .* the dataset has 4"):
        pipeline.make_iterator(
            Indexed(16), global_batch=16, seed=0, image_size=16, sampler="identity_balanced", images_per_identity=2
        )


def test_bad_labels_and_sizes_are_reported():
    class Bad(Indexed):
        def __getitem__(self, i):
            return {"image": np.zeros((16, 16, 3), np.uint8), "label": self.n + 1}

    with pytest.raises(ValueError, match=r"label 17, outside \[0, 16\)"):
        next(pipeline.make_iterator(Bad(16), global_batch=4, seed=0, image_size=16, threads=1))
    with pytest.raises(ValueError, match=r"shape \(16, 16, 3\), expected \(32, 32, 3\)"):
        decode({"image": np.zeros((16, 16, 3), np.uint8), "label": 0}, 32)
    with pytest.raises(ValueError, match="cannot decode image"):
        decode({"encoded": b"not a jpeg", "label": 0}, 32)


def test_augmentations():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    flipped = Augment(flip=1.0)(image, np.random.default_rng(0))
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    np.testing.assert_array_equal(Augment(flip=0.0)(image, np.random.default_rng(0)), image)
    gray = Augment(flip=0.0, grayscale=1.0)(image, np.random.default_rng(0))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    for kw in (dict(blur=1.0), dict(downup=1.0), dict(color_jitter=1.0)):
        out = Augment(flip=0.0, **kw)(image, np.random.default_rng(1))
        assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)
        np.testing.assert_array_equal(out, Augment(flip=0.0, **kw)(image, np.random.default_rng(1)))
    with pytest.raises(ValueError, match="blur=1.5 is outside"):
        Augment(blur=1.5)
