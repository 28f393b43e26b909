"""Face-NMS pruning: the greedy suppression against a plain reference, a RecordIO with
injected duplicates end to end, keep-list vs rewritten RecordIO, resume, bad input."""

import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from pfc_jax.data import pipeline, prune, recordio
from pfc_jax.data.augment import Augment
from pfc_jax.data.sources import SourceError, Subset, read_keep_list
from tests.cli_helpers import exits_with
from tests.test_export import SIZE, make_workdir


def reference_keep(features, labels, threshold):
    """Plain loops: rank by cosine to the identity's normalized mean (ties: index), keep a
    face unless its cosine to a kept face of its identity exceeds the threshold."""
    keep = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = [int(i) for i in np.flatnonzero(labels == c)]
        mean = np.sum([features[i].astype(np.float64) for i in members], axis=0)
        mean /= max(np.linalg.norm(mean), 1e-12)
        score = {i: float(np.dot(features[i], mean.astype(np.float32))) for i in members}
        kept = []
        for i in sorted(members, key=lambda i: (-score[i], i)):
            if all(float(np.dot(features[i], features[j])) <= threshold for j in kept):
                kept.append(i)
        keep[kept] = True
    return keep


def test_greedy_suppression_equals_a_plain_reference():
    rng = np.random.default_rng(0)
    sizes = [1, 2, 3, 5, 8, 13, 17, 40]
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    rng.shuffle(labels)  # images of an identity need not be adjacent
    features = rng.normal(size=(len(labels), 6)).astype(np.float32)
    features[labels == 5] = features[labels == 5] * 0.2 + features[np.flatnonzero(labels == 5)[0]]  # a tight cluster
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    twins = np.flatnonzero(labels == 6)[:3]
    features[twins[1:]] = features[twins[0]]  # exact copies: tied scores, similarity 1
    suppressor = prune.Suppressor(features, labels)
    for t in (-1.0, -0.2, 0.0, 0.3, 0.6, 0.9, 0.99, 1.0):
        np.testing.assert_array_equal(suppressor.keep(t), reference_keep(features, labels, t), err_msg=f"t={t}")
    # every identity keeps an image, even at the lowest threshold
    assert set(labels[suppressor.keep(-1.0)]) == set(labels) and suppressor.keep(-1.0).sum() == len(sizes)


def test_a_similarity_equal_to_the_threshold_is_kept():
    features = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
    labels = np.zeros(3, int)
    s = prune.Suppressor(features, labels)
    boundary = float(features[0] @ features[1])  # exactly representable: 0.6f
    assert s.keep(boundary).sum() == reference_keep(features, labels, boundary).sum()
    assert s.keep(boundary).sum() > s.keep(np.nextafter(boundary, -1.0)).sum()


def _png(image):
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def _picture(rng):
    low = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((SIZE, SIZE), Image.BILINEAR))


@pytest.fixture(scope="module")
def redundant(tmp_path_factory):
    """A RecordIO of 8 identities: distinct pictures plus injected exact and near (pixel
    noise +-2) duplicates, returned as (original, copy) index pairs; and a proxy workdir."""
    tmp = tmp_path_factory.mktemp("prune")
    rng = np.random.default_rng(0)
    images, labels, duplicates = [], [], []
    plan = {0: 5, 1: 4, 2: 6, 3: 1, 4: 3, 5: 5, 6: 2, 7: 4}  # distinct pictures per identity
    for c, n in plan.items():
        own = [_picture(rng) for _ in range(n)]
        extra = []  # (which of own, the copy)
        if c in (0, 2, 5):  # exact copies
            extra.append((0, own[0].copy()))
        if c in (1, 2, 4, 7):  # near copies
            noisy = np.clip(own[-1].astype(int) + rng.integers(-2, 3, own[-1].shape), 0, 255).astype(np.uint8)
            extra.append((n - 1, noisy))
        if c == 6:  # an identity of one picture twice: one must stay
            extra.append((1, own[1].copy()))
        first = len(images)
        images += own + [copy for _, copy in extra]
        labels += [c] * (n + len(extra))
        duplicates += [(first + k, first + n + e) for e, (k, _) in enumerate(extra)]
    recordio.write_dataset(str(tmp / "rec"), [_png(i) for i in images], labels, len(plan), (SIZE, SIZE))
    make_workdir(tmp / "proxy", "iresnet_narrow")
    return tmp, np.asarray(labels), duplicates


def test_injected_duplicates_are_exactly_what_is_removed(redundant, capsys):
    tmp, labels, duplicates = redundant
    report = prune.prune(
        f"rec:{tmp / 'rec'}", tmp / "out", workdir=str(tmp / "proxy"), threshold=0.9999, write="both", progress=False
    )
    keep = np.load(tmp / "out" / "keep.npy")
    removed = set(range(len(labels))) - set(keep.tolist())
    # one of each injected pair and nothing else; of exact copies (tied) the later one
    assert len(removed) == len(duplicates) and all(len(removed & {a, b}) == 1 for a, b in duplicates)
    assert all(b in removed for a, b in duplicates if labels[a] in (0, 5, 6))
    assert report["images_after"] == len(labels) - len(duplicates) and report["histogram"]["min_kept_per_identity"] == 1
    assert json.loads((tmp / "out" / "report.json").read_text())["threshold"] == 0.9999
    printed = capsys.readouterr().out
    assert f"kept {len(keep)} of {len(labels)} images" in printed and "config.data.keep_list=" in printed
    # the rewritten RecordIO holds the kept images, labels unchanged, in the source's order
    original, core = recordio.RecordIODataset(str(tmp / "rec")), recordio.RecordIODataset(str(tmp / "out"))
    assert len(core) == len(keep) and core.num_classes == original.num_classes
    np.testing.assert_array_equal(core.labels(), original.labels()[keep])
    assert all(core[j]["encoded"] == original[int(i)]["encoded"] for j, i in enumerate(keep))
    # ... and trains like the keep-list on the original: the same batches
    subset = Subset(original, read_keep_list(str(tmp / "out" / "keep.npy"), len(original)))
    batches = []
    for source in (subset, core):
        it = pipeline.make_iterator(source, global_batch=8, seed=3, image_size=SIZE, augment=Augment(), threads=1)
        batches.append([next(it) for _ in range(6)])  # more than an epoch
        it.close()
    for (xa, ya), (xb, yb) in zip(*batches):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_keep_ratio_lands_within_one_image_per_identity(redundant):
    tmp, labels, _ = redundant
    n, identities = len(labels), len(np.unique(labels))
    for ratio in (0.6, 0.8):
        out = tmp / f"ratio_{ratio}"
        report = prune.prune(
            f"rec:{tmp / 'rec'}", out, workdir=str(tmp / "proxy"), keep_ratio=ratio, cache=tmp / "out" / "cache",
            progress=False,
        )  # fmt: skip
        assert abs(report["images_after"] - ratio * n) <= identities
        assert report["histogram"]["min_kept_per_identity"] == 1
    with pytest.raises(prune.PruneError, match="fewer than the 8 identities"):
        prune.prune(f"rec:{tmp / 'rec'}", tmp / "r01", workdir=str(tmp / "proxy"), keep_ratio=0.1, progress=False)


def test_interrupted_embedding_resumes_from_its_cache(redundant, tmp_path):
    tmp, labels, _ = redundant
    source = recordio.RecordIODataset(str(tmp / "rec"))
    from pfc_jax.inference import Embedder

    embedder = Embedder.from_workdir(tmp / "proxy", batch_size=4)
    calls = []

    def counting(batches):
        for b in embedder.embed_batches(batches):
            calls.append(len(b))
            if fail_after is not None and len(calls) > fail_after:
                raise KeyboardInterrupt
            yield b

    kw = dict(image_size=SIZE, batch_size=4, cache_dir=tmp_path / "c", fingerprint={"m": 1}, chunk=8, progress=False)
    fail_after = 3  # dies inside the second chunk of 8
    with pytest.raises(KeyboardInterrupt):
        prune.embed_source(source, counting, **kw)
    assert sorted(p.name for p in (tmp_path / "c").glob("chunk_*.npy")) == ["chunk_000000000000.npy"]
    calls.clear()
    fail_after = None
    resumed = prune.embed_source(source, counting, **kw)
    assert sum(calls) == len(source) - 8  # the first chunk came from the cache
    whole = prune.embed_source(source, embedder.embed_batches, **{**kw, "cache_dir": tmp_path / "d"})
    np.testing.assert_allclose(resumed, whole, rtol=1e-6, atol=1e-6)
    with pytest.raises(prune.PruneError, match="holds features of another run"):
        prune.embed_source(source, counting, **{**kw, "fingerprint": {"m": 2}})


def test_bad_input_is_named(redundant, tmp_path, capsys):
    tmp, labels, _ = redundant
    args = ["--source", f"rec:{tmp / 'rec'}", "--out", str(tmp_path / "o")]
    cases = [
        (["--workdir", str(tmp_path / "nowhere"), "--threshold", "0.9"], "nowhere"),
        (["--workdir", str(tmp / "proxy"), "--keep-ratio", "1.5"], r"--keep-ratio 1.5: must be in \(0, 1\]"),
        (["--workdir", str(tmp / "proxy"), "--keep-ratio", "0"], r"--keep-ratio 0.0: must be in \(0, 1\]"),
        (["--onnx", str(tmp_path / "m.onnx"), "--threshold", "0.9"], "m.onnx: no such file"),
        (["--workdir", str(tmp / "proxy"), "--threshold", "2"], "a cosine similarity"),
    ]
    for extra, message in cases:
        with exits_with(capsys, message):
            prune.main(args[:2] + extra + args[2:])
    with exits_with(capsys, "is not a source"):
        prune.main(["--source", "zip:/x", "--workdir", str(tmp / "proxy"), "--threshold", "0.9", "--out", "o"])
    assert not (tmp_path / "o" / "keep.npy").exists()
    # keep-lists that do not fit the dataset
    np.save(tmp_path / "k.npy", np.array([0, 3, len(labels)], np.int64))
    with pytest.raises(SourceError, match=f"names image {len(labels)}, but the dataset has {len(labels)} images"):
        read_keep_list(str(tmp_path / "k.npy"), len(labels))
    np.save(tmp_path / "k.npy", np.array([3, 1], np.int64))
    with pytest.raises(SourceError, match="in increasing order"):
        read_keep_list(str(tmp_path / "k.npy"), len(labels))
    with pytest.raises(SourceError, match="does not exist"):
        read_keep_list(str(tmp_path / "none.npy"), len(labels))
    (tmp_path / "k.txt").write_text("# kept\n0\n2\n")
    assert read_keep_list(str(tmp_path / "k.txt"), len(labels)).tolist() == [0, 2]


def test_hard_synthetic_duplicates_repeat_earlier_shots_with_fresh_noise():
    from pfc_jax.data.hard_synthetic import HardSyntheticIdentities, World

    plain = HardSyntheticIdentities(World(num_identities=30, seed=1), image_size=16)
    repeated = HardSyntheticIdentities(World(num_identities=30, seed=1, duplicates=0.5), image_size=16)
    pairs = [(c, j) for c in range(30) for j in range(int(repeated.counts[c]))]
    shots = [repeated.shot_of(c, j) for c, j in pairs]
    assert all(s <= j for s, (c, j) in zip(shots, pairs)) and 0.3 < np.mean([s < j for s, (_, j) in zip(shots, pairs)])
    c, j = next((c, j) for (c, j), s in zip(pairs, shots) if s < j)
    a, b = repeated.render(c, j).astype(int), repeated.render(c, repeated.shot_of(c, j)).astype(int)
    assert 0 < np.abs(a - b).mean() < 12  # the same shot, other noise
    assert plain.shot_of(c, j) == j


def test_command_line_writes_the_keep_list(redundant, tmp_path, capsys):
    tmp, labels, duplicates = redundant
    prune.main(
        ["--source", f"rec:{tmp / 'rec'}", "--workdir", str(tmp / "proxy"), "--threshold", "0.9999",
         "--out", str(tmp_path / "o"), "--cache", str(tmp / "out" / "cache")]
    )  # fmt: skip
    assert "kept" in capsys.readouterr().out
    assert len(np.load(tmp_path / "o" / "keep.npy")) == len(labels) - len(duplicates)
    assert sorted(p.name for p in pathlib.Path(tmp_path / "o").iterdir()) == ["keep.npy", "report.json"]
