"""Verification (.bin, 10-fold), IJB 1:1, the evaluators in training and the evaluate CLI."""

import io
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pfc_jax import evaluate
from pfc_jax.data import synth
from pfc_jax.data.synthetic import SyntheticIdentities
from pfc_jax.evaluation import ijb, verification, warp
from tests import recipes

ROOT = pathlib.Path(__file__).parents[1]


# ---- 10-fold protocol ------------------------------------------------------------------


def reference_protocol(emb, issame):
    """The protocol written out plainly: cosine-based distance, loops, explicit folds."""
    emb = [e / np.sqrt(sum(float(v) * float(v) for v in e)) for e in np.asarray(emb, np.float64)]
    dist = np.array([2.0 - 2.0 * float(np.dot(emb[2 * i], emb[2 * i + 1])) for i in range(len(issame))])
    n = len(issame)
    sizes = [n // 10 + (1 if k < n % 10 else 0) for k in range(10)]
    bounds = np.cumsum([0] + sizes)
    accs, thresholds, vals = [], [], []
    for k in range(10):
        test = list(range(bounds[k], bounds[k + 1]))
        train = [i for i in range(n) if i not in test]
        best_t, best_acc = None, -1.0
        for j in range(400):
            t = j * 0.01
            acc = np.mean([(dist[i] < t) == issame[i] for i in train])
            if acc > best_acc:
                best_t, best_acc = t, acc
        accs.append(np.mean([(dist[i] < best_t) == issame[i] for i in test]))
        thresholds.append(best_t)
        negatives = [i for i in train if not issame[i]]
        # Walk the grid upwards. An exact hit is remembered and overwritten while the FAR
        # stays on the target (the last one counts); the first point past the target ends
        # the walk: the hit if there was one, else interpolation from the point before.
        t_far, before, hit = 0.0, None, None
        for j in range(4000):
            t = j * 0.001
            far = sum(dist[i] < t for i in negatives) / len(negatives)
            if far == 1e-3:
                hit = t
            elif far < 1e-3:
                before = (t, far)
            else:
                if hit is not None:
                    t_far = hit
                elif before is None:
                    t_far = t
                else:
                    t_far = before[0] + 0.001 * (1e-3 - before[1]) / (far - before[1])
                break
        else:
            t_far = 0.0 if hit is None else hit
        positives = [i for i in test if issame[i]]
        vals.append(sum(dist[i] < t_far for i in positives) / len(positives))
    return np.array(accs), np.mean(thresholds), np.mean(vals)


@pytest.mark.parametrize("pairs", [300, 305])
def test_ten_folds_match_an_independent_computation(pairs):
    rng = np.random.default_rng(pairs)
    issame = np.arange(pairs) % 2 == 0
    rng.shuffle(issame)
    a = rng.normal(size=(pairs, 32))
    b = np.where(issame[:, None], a + 3.0 * rng.normal(size=(pairs, 32)), rng.normal(size=(pairs, 32)))
    emb = np.stack([a, b], 1).reshape(2 * pairs, 32) * rng.uniform(0.5, 3, (2 * pairs, 1))
    result = verification.evaluate_pairs(emb, issame)
    accs, threshold, val = reference_protocol(emb, issame)
    np.testing.assert_allclose(result.fold_accuracies, accs, rtol=0, atol=1e-12)
    assert result.accuracy == pytest.approx(accs.mean(), abs=1e-12)
    assert result.accuracy_std == pytest.approx(accs.std(), abs=1e-12)
    assert result.threshold == pytest.approx(threshold, abs=1e-9)
    assert result.val == pytest.approx(val, abs=1e-12)
    assert 0.6 < result.accuracy < 1.0  # the data is neither trivial nor random


def _pairs_at_distances(dist):
    """Unit embeddings [2P, 2] whose pairs have the squared distances ``dist``."""
    angle = np.arccos(1.0 - np.asarray(dist) / 2.0)
    first = np.stack([np.ones_like(angle), np.zeros_like(angle)], 1)
    second = np.stack([np.cos(angle), np.sin(angle)], 1)
    return np.stack([first, second], 1).reshape(-1, 2)


def test_val_threshold_is_the_last_of_an_exact_far_stretch():
    """Nine training folds of 1,000 negatives each accept exactly 9 of 9,000 negatives
    (FAR = 1e-3 exactly) for every grid threshold from 0.801 to 1.200: the VAL threshold
    is 1.200, as insightface's spline gives, not 0.801."""
    # Per fold: 100 positives at 0.3005, 0.3125, ..., 1.4885; one negative at 0.8005, one
    # at 1.2005 (ends the stretch), 998 far away. Every distance is half a grid step off
    # the grid, so rounding cannot move a pair across a threshold.
    positives = 0.3005 + 0.012 * np.arange(100)
    negatives = np.concatenate([[0.8005, 1.2005], np.linspace(2.0005, 3.9005, 998)])
    fold_dist = np.concatenate([positives, negatives])
    fold_same = np.arange(1100) < 100
    dist, issame = np.tile(fold_dist, 10), np.tile(fold_same, 10)

    train = np.arange(1100, 11000)  # the first fold held out
    _, far_train = verification._val_far(dist[train], issame[train], verification.VAL_THRESHOLDS)
    stretch = np.flatnonzero(far_train == 1e-3)
    np.testing.assert_array_equal(stretch, np.arange(801, 1201))
    threshold = verification._threshold_at_far(far_train, verification.VAL_THRESHOLDS, 1e-3)
    assert threshold == verification.VAL_THRESHOLDS[1200]

    result = verification.evaluate_pairs(_pairs_at_distances(dist), issame)
    assert result.val == pytest.approx(0.75, abs=1e-12)  # positives below 1.2: k <= 74 (0.42 at 0.801)
    assert result.val_std == pytest.approx(0.0, abs=1e-12)
    assert result.far == pytest.approx(1e-3, abs=1e-12)  # the 0.8005 negative of the held-out fold


def test_far_threshold_between_points_and_out_of_reach():
    grid = np.arange(6) * 0.5
    # Strictly between 0.0005 (last below, at 1.0) and 0.002 (first above, at 1.5).
    far = np.array([0.0, 0.0, 0.0005, 0.002, 0.002, 0.01])
    assert verification._threshold_at_far(far, grid, 1e-3) == pytest.approx(1.0 + 0.5 / 3)
    # An exact hit: the last grid point of the stretch.
    far = np.array([0.0, 0.0005, 0.001, 0.001, 0.0015, 0.01])
    assert verification._threshold_at_far(far, grid, 1e-3) == 1.5
    # Never reached.
    far = np.array([0.0, 0.0, 0.0, 0.0005, 0.0005, 0.0009])
    assert verification._threshold_at_far(far, grid, 1e-3) == 0.0


def test_perfect_embeddings_score_one():
    ids = np.repeat(np.arange(100), 2)
    emb = np.eye(200)[ids]  # pair i: identities (i, i) or (i, i+1)
    issame = np.arange(100) % 2 == 0
    emb[1::2][~issame] = np.roll(np.eye(200)[ids[::2]], 1, axis=1)[~issame]
    r = verification.evaluate_pairs(emb, issame)
    assert r.accuracy == 1.0 and r.accuracy_std == 0.0 and r.val == 1.0


# ---- .bin files ------------------------------------------------------------------------


def test_synth_pair_file_loads(tmp_path):
    synth.write(
        str(tmp_path / "ds"),
        identities=5,
        images_per_id=2,
        image_size=32,
        pairs=20,
        holdout_identities=4,
        progress=False,
    )
    pairs = verification.PairSet.load(tmp_path / "ds" / "synth_val.bin", image_size=32)
    assert pairs.images.shape == (40, 32, 32, 3) and pairs.images.dtype == np.uint8
    assert pairs.issame.tolist() == [i % 2 == 0 for i in range(20)]
    # Another size is resized on load.
    assert verification.PairSet.load(tmp_path / "ds" / "synth_val.bin", image_size=48).images.shape[1:3] == (48, 48)


def _jpeg(value):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_python2_and_protocol2_pair_files_load(tmp_path):
    images = [_jpeg(10), _jpeg(200)]
    # As Python 2 pickled it: the images are `str` (SHORT_BINSTRING), read back as bytes.
    body = b"".join(
        b"U" + bytes([len(x)]) + x if len(x) < 256 else b"T" + len(x).to_bytes(4, "little") + x for x in images
    )
    py2 = b"\x80\x02](" + body + b"e]\x88a\x86q\x00."
    (tmp_path / "py2.bin").write_bytes(py2)
    loaded, issame = verification.load_bin(tmp_path / "py2.bin")
    assert loaded == images and issame.tolist() == [True]
    # Python 3, protocol 2: bytes go through _codecs.encode.
    (tmp_path / "p2.bin").write_bytes(pickle.dumps((images, [False]), protocol=2))
    loaded, issame = verification.load_bin(tmp_path / "p2.bin")
    assert loaded == images and issame.tolist() == [False]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([_Payload(marker), b"x"], [True])))
    with pytest.raises(verification.PairFileError, match="refusing to load .*system"):
        verification.load_bin(tmp_path / "evil.bin")
    assert not marker.exists()
    # An object that is not plain data (a numpy array) is refused as well.
    (tmp_path / "np.bin").write_bytes(pickle.dumps(([np.zeros(3), b"x"], [True])))
    with pytest.raises(verification.PairFileError, match="refusing to load numpy"):
        verification.load_bin(tmp_path / "np.bin")


@pytest.mark.parametrize(
    "content, message",
    [
        (pickle.dumps([b"a", b"b", b"c"]), "expected a pickle of"),
        (pickle.dumps(([b"a", b"b", b"c"], [True])), "3 images for 1 pairs"),
        (pickle.dumps(([b"a", 5], [True])), "list of encoded images"),
        (pickle.dumps(([b"a", b"b"], ["yes"])), "same/different booleans"),
        (b"\x80\x04garbage", "not a verification pair file"),
    ],
)
def test_malformed_pair_files(tmp_path, content, message):
    (tmp_path / "x.bin").write_bytes(content)
    with pytest.raises(verification.PairFileError, match=message):
        verification.load_bin(tmp_path / "x.bin")


def test_missing_pair_file(tmp_path):
    with pytest.raises(verification.PairFileError, match="does not exist"):
        verification.load_bin(tmp_path / "lfw.bin")


# ---- IJB ---------------------------------------------------------------------------------


def _similarity(scale, angle, tx, ty):
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def test_similarity_transform_recovers_the_map():
    m = _similarity(1.7, 0.3, 12.0, -5.0)
    src = np.random.default_rng(0).uniform(0, 100, (5, 2))
    dst = src @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(ijb.similarity_transform(src, dst), m, atol=1e-10)


def _loose_crop(face, m, size=160):
    """``face`` placed into a larger image by the similarity ``m`` (face -> crop coordinates)."""
    full = np.vstack([m, [0, 0, 1]])
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    inverse = np.linalg.inv(shift @ full @ np.linalg.inv(shift))
    return Image.fromarray(face).transform(
        (size, size), Image.AFFINE, data=tuple(inverse[:2].ravel()), resample=Image.BILINEAR
    )


def test_alignment_undoes_a_similarity():
    face = SyntheticIdentities(1, 1, image_size=112, seed=3)[0]["image"]
    m = _similarity(1.25, -0.2, 30.0, 40.0)
    crop = _loose_crop(face, m, size=200)
    landmarks = ijb.ARCFACE_TEMPLATE @ m[:, :2].T + m[:, 2]
    aligned = ijb.align(crop, landmarks).astype(float)
    inner = (slice(8, -8), slice(8, -8))
    assert np.abs(aligned[inner] - face[inner]).mean() < 4.0  # two bilinear resamplings apart
    # Landmarks off by a few pixels: the face is visibly misplaced.
    shifted = ijb.align(crop, landmarks + [6.0, 0.0]).astype(float)
    assert np.abs(shifted[inner] - face[inner]).mean() > 8.0


def exact_bilinear(image, m, size):
    """float64 [size, size, C]: OpenCV's warp written out plainly, without any rounding.

    Output pixel (x, y) reads the input at inverse(m) (x, y), pixel centers at integers
    (OpenCV's ``warpAffine``); the four neighbours are weighted bilinearly and a neighbour
    outside the image is the border value 0 (OpenCV's BORDER_CONSTANT: ``iii|abcdefgh|iii``).
    """
    full = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    h, w = image.shape[:2]
    out = np.zeros((size, size, image.shape[2]))
    for y in range(size):
        for x in range(size):
            sx, sy, _ = full @ [x, y, 1.0]
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
                px, py = x0 + dx, y0 + dy
                weight = (1 - abs(sx - px)) * (1 - abs(sy - py))
                if 0 <= px < w and 0 <= py < h:
                    out[y, x] += weight * image[py, px]
    return out


def straddles_the_edge(m, shape, size):
    """bool [size, size]: output pixels whose four input neighbours lie partly outside the image."""
    full = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    ys, xs = np.mgrid[0:size, 0:size]
    sx, sy, _ = np.tensordot(full, np.stack([xs, ys, np.ones_like(xs)]), axes=1)
    x0, y0 = np.floor(sx), np.floor(sy)
    inside = [
        (0 <= x0 + dx) & (x0 + dx < shape[1]) & (0 <= y0 + dy) & (y0 + dy < shape[0]) for dx in (0, 1) for dy in (0, 1)
    ]
    return np.any(inside, axis=0) & ~np.all(inside, axis=0)


def test_warp_is_unbiased_against_an_exact_bilinear_warp():
    # A smooth face-like image (bilinear interpolation's own error is then small) with a
    # frame that runs past its top-left corner, as loose IJB crops often do.
    rng = np.random.default_rng(4)
    coarse = rng.integers(0, 256, (9, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((70, 80), Image.BICUBIC))
    m = _similarity(0.62, 0.35, 6.0, -9.0)
    reference = exact_bilinear(image, m, 48)
    edge = straddles_the_edge(m, image.shape, 48)
    assert edge.sum() > 20 and (reference.sum(axis=2) == 0).sum() > 20  # a blended band and black beyond
    # opencv: the source coordinate sits on a 1/32-pixel grid (off by <= 1/64 on each axis),
    # so a value may be off by that much of the local slope: a few grey levels on the smooth
    # inside, up to 255/32 on the edge band, where the image drops to the zero border.
    for method, inside, on_edge in (("opencv", 1.5, 0.5 + 255 / 32), ("exact", 0.5 + 1e-9, 0.5 + 1e-9)):
        out = warp.warp_affine(image, m, 48, method).astype(float)
        error = out - reference
        assert abs(error.mean()) < 0.05, method  # rounds: a truncating warp is ~0.5 darker
        assert np.abs(error[~edge]).max() <= inside, method
        assert np.abs(error[edge]).max() <= on_edge, method  # blended with 0, not repeated or cut
    assert (np.floor(reference) - reference).mean() < -0.3  # truncation: what the mean check catches


def test_warp_equals_opencv_byte_for_byte():
    # OpenCV's own output (tests/fixtures/opencv_warps.py): 4.x byte for byte, 5.x to within 1.
    ref = np.load(ROOT / "tests" / "fixtures" / "opencv_warps.npz")
    image, size = ref["image"], ref["warped_opencv4"].shape[1]
    ours = np.stack([warp.warp_affine(image, m, size, "opencv") for m in ref["matrices"]])
    np.testing.assert_array_equal(ours, ref["warped_opencv4"])
    exact = np.stack([warp.warp_affine(image, m, size, "exact") for m in ref["matrices"]])
    difference = np.abs(exact.astype(int) - ref["warped_opencv5"])
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    assert (ours != ref["warped_opencv5"]).mean() > 0.05  # the two OpenCV generations really differ
    # One channel warps as each channel of three.
    np.testing.assert_array_equal(warp.warp_affine(image[..., 1], ref["matrices"][1], size), ours[1][..., 1])
    with pytest.raises(ValueError, match="uint8"):
        warp.warp_affine(image.astype(np.float32), ref["matrices"][0], size)
    with pytest.raises(ValueError, match="warp must be one of"):
        warp.warp_affine(image, ref["matrices"][0], size, "pillow")


def make_ijb(root, target="IJBC", identities=6, images=4, size=112):
    """A miniature IJB release: per identity two templates of two crops each."""
    world = SyntheticIdentities(identities, images, image_size=size, seed=11, first_identity=500)
    rng = np.random.default_rng(0)
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    t = target.lower()
    points, tid_mid, names = [], [], []
    template_identity = {}
    for ident in range(identities):
        for k in range(images):
            name = f"{ident * images + k}.jpg"
            m = _similarity(rng.uniform(1.1, 1.4), rng.uniform(-0.3, 0.3), rng.uniform(0, 30), rng.uniform(0, 30))
            crop = _loose_crop(world.render(ident, k), m, size=int(size * 1.8))
            crop.save(root / "loose_crop" / name, quality=95)
            lm = ijb.ARCFACE_TEMPLATE * size / 112 @ m[:, :2].T + m[:, 2]
            score = rng.uniform(0.6, 1.0)
            points.append(f"{name} " + " ".join(f"{v:.3f}" for v in lm.ravel()) + f" {score:.4f}")
            template = 10 + 2 * ident + k // 2
            media = 1000 + 3 * ident + (k if k >= 2 else 0)  # template A: one media; B: two
            tid_mid.append(f"{name} {template} {media}")
            template_identity[template] = ident
            names.append(name)
    (root / "meta" / f"{t}_name_5pts_score.txt").write_text("\n".join(points) + "\n")
    (root / "meta" / f"{t}_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    ts = sorted(template_identity)
    pairs = [
        f"{a} {b} {int(template_identity[a] == template_identity[b])}" for i, a in enumerate(ts) for b in ts[i + 1 :]
    ]
    (root / "meta" / f"{t}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return template_identity


def test_template_pooling_matches_a_plain_computation(tmp_path):
    make_ijb(tmp_path)
    protocol = ijb.IJBProtocol.load(tmp_path, "IJBC")
    feats = np.random.default_rng(1).normal(size=(len(protocol.images), 8))
    ids, pooled = ijb.template_features(feats, protocol)
    for template, row in zip(ids, pooled):
        medias = {}
        for i in range(len(protocol.images)):
            if protocol.templates[i] == template:
                medias.setdefault(protocol.medias[i], []).append(feats[i] * protocol.scores[i])
        expected = sum(np.mean(v, axis=0) for v in medias.values())
        np.testing.assert_allclose(row, expected / np.linalg.norm(expected), atol=1e-12)
    # Identity-revealing features make every genuine pair outscore every impostor.
    onehot = np.eye(6)[np.arange(len(protocol.images)) // 4] + 0.01 * feats[:, :6]
    tar = ijb.evaluate(protocol, onehot)
    assert set(tar) == set(ijb.FARS) and all(v == 1.0 for v in tar.values())


def test_tar_at_far_picks_the_nearest_roc_point():
    scores = np.array([0.9, 0.8, 0.3, 0.85, 0.2, 0.1, 0.05])
    labels = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    tar = ijb.tar_at_far(scores, labels, fars=(1e-6, 0.25, 0.5, 1.0), readout="full")
    # FAR 0.25 from 0.85 (TAR 1/3) down to 0.3 (TAR 1): the highest TAR of those points.
    # FAR 1e-6 is nearest to FAR 0: above 0.85, TAR 1/3.
    assert tar == {1e-6: pytest.approx(1 / 3), 0.25: 1.0, 0.5: 1.0, 1.0: 1.0}
    assert ijb.tar_at_far(scores, labels, fars=(0.3,), readout="full")[0.3] == 1.0  # nearest: 0.25, not 0.5


def test_tar_readout_on_a_horizontal_run():
    # Descending: genuine, three impostors, two genuine, one impostor (3 genuine, 4 impostor).
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    labels = np.array([1, 0, 0, 0, 1, 1, 0], bool)
    fpr, tpr = ijb.roc(scores, labels, "full")
    np.testing.assert_array_equal(fpr, [0, 0, 0.25, 0.5, 0.75, 0.75, 0.75, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1, 1])
    # Corners: the run at TAR 1/3 keeps its ends only, the vertical run at FAR 0.75 too.
    fpr, tpr = ijb.roc(scores, labels, "corners")
    np.testing.assert_array_equal(fpr, [0, 0, 0.75, 0.75, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1 / 3, 1, 1])
    fars = (0.25, 0.375, 0.5)
    # Full: FAR 0.25 and 0.5 are points of the run (TAR 1/3); 0.375 is as near to 0.25 as to 0.5.
    assert ijb.tar_at_far(scores, labels, fars, "full") == pytest.approx({0.25: 1 / 3, 0.375: 1 / 3, 0.5: 1 / 3})
    # Corners: 0.25 is nearer FAR 0 than 0.75 (TAR 1/3); 0.5 is nearer 0.75 (TAR 1); 0.375 is
    # as near to both, and the published readout takes the higher TAR.
    assert ijb.tar_at_far(scores, labels, fars) == pytest.approx({0.25: 1 / 3, 0.375: 1.0, 0.5: 1.0})
    with pytest.raises(ijb.IJBError, match="readout must be one of"):
        ijb.tar_at_far(scores, labels, fars, "sklearn")


def test_ijb_layout_errors(tmp_path):
    with pytest.raises(ijb.IJBError, match="loose_crop is missing"):
        ijb.IJBProtocol.load(tmp_path, "IJBB")
    make_ijb(tmp_path, target="IJBB")
    with pytest.raises(ijb.IJBError, match="must be one of"):
        ijb.IJBProtocol.load(tmp_path, "IJBA")
    meta = tmp_path / "meta" / "ijbb_name_5pts_score.txt"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join(lines[:3] + [lines[3].rsplit(" ", 1)[0]] + lines[4:]))
    with pytest.raises(ijb.IJBError, match=r"ijbb_name_5pts_score.txt:4: expected 12 fields, got 11"):
        ijb.IJBProtocol.load(tmp_path, "IJBB")


# ---- In training and from the command line ---------------------------------------------

TRAIN = [
    "--config.model.name=iresnet_narrow",
    "--config.model.embedding_dim=16",
    "--config.data.image_size=32",
    "--config.global_batch_size=32",
    "--config.data.synthetic.num_identities=100",
    "--config.data.synthetic.images_per_identity=8",
    "--config.total_steps=40",
    "--config.log_every_steps=10",
    "--config.checkpoint_every_steps=40",
    "--config.eval.bins=synthetic",
    "--config.eval.every_steps=20",
]


def _env():
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return e


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT
    )


def _evaluate(capsys, *argv):
    """``python -m pfc_jax.evaluate`` in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        evaluate.main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eval") / "run"
    out = _run("pfc_jax.main", "--config", str(ROOT / "configs" / "synthetic.py"), "--workdir", str(workdir), *TRAIN)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out


def test_training_evaluates_and_learns(trained):
    workdir, out = trained
    assert "eval step 20: synthetic" in out.stdout and "eval step 40: synthetic" in out.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/synthetic/accuracy" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert set(evals[-1]) == {
        "step",
        "eval/synthetic/accuracy",
        "eval/synthetic/accuracy_std",
        "eval/synthetic/threshold",
        "eval/synthetic/val_at_far_1e-3",
    }
    assert evals[-1]["eval/synthetic/accuracy"] > 0.7  # held-out identities: chance is 0.5
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"eval/synthetic/accuracy" in events[0].read_bytes()


def test_evaluate_cli_on_bin_files_matches_training(trained, tmp_path, capsys):
    workdir, _ = trained
    # The same held-out pairs, written to disk as an insightface .bin.
    synth.write(str(tmp_path / "ds"), identities=100, images_per_id=8, image_size=32, progress=False)
    code, stdout, stderr = _evaluate(
        capsys, "--workdir", str(workdir), "--bin", str(tmp_path / "ds" / "synth_val.bin"), "synthetic", "--json"
    )
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout)
    assert stdout.count("\n") == 1  # one JSON object; the progress goes to stderr
    lines = [part.strip() for part in stderr.replace("\r", "\n").splitlines() if part.strip()]
    assert lines[0] == f"loading checkpoint step 40 of {workdir}", stderr[-3000:]
    assert "loading synth_val: 600 pairs" in lines and "loading synthetic: 600 pairs" in lines, stderr[-3000:]
    for name in ("synth_val", "synthetic"):
        counts = [line.split()[2] for line in lines if line.startswith(f"embedding {name}: ")]
        assert counts[0] == "0/1200" and counts[-1] == "1200/1200" and len(counts) > 2, stderr[-3000:]
        assert any(line.startswith(f"embedding {name}: 1200/1200 images (") for line in lines)
    assert result["step"] == 40 and result["model"]["name"] == "iresnet_narrow"
    from_file, in_memory = result["bins"]["synth_val"], result["bins"]["synthetic"]
    assert from_file["pairs"] == 600
    assert from_file["accuracy"] == pytest.approx(in_memory["accuracy"], abs=1e-12)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    during = [r for r in records if r["step"] == 40 and "eval/synthetic/accuracy" in r][0]
    assert in_memory["accuracy"] == pytest.approx(during["eval/synthetic/accuracy"], abs=1e-6)
    code, stdout, _ = _evaluate(capsys, "--workdir", str(workdir), "--bin", "synthetic")
    assert code == 0 and "synthetic" in stdout and "VAL@FAR=1e-3" in stdout
    # A bare name resolves as config.eval.bins does: <eval.dir or data.path>/<name>.bin.
    named = shutil.copytree(workdir, tmp_path / "named")
    config = json.loads((named / "config.json").read_text())
    config["eval"]["dir"] = str(tmp_path / "ds")
    (named / "config.json").write_text(json.dumps(config))
    code, stdout, stderr = _evaluate(capsys, "--workdir", str(named), "--bin", "synth_val", "--json")
    assert code == 0, stderr[-3000:]
    assert json.loads(stdout)["bins"]["synth_val"]["accuracy"] == pytest.approx(from_file["accuracy"], abs=1e-12)


def test_evaluate_cli_on_ijb_resumes_from_its_cache(trained, tmp_path, capsys):
    workdir, _ = trained
    make_ijb(tmp_path / "IJBC", size=32)
    cmd = [
        "--workdir",
        str(workdir),
        "--ijb",
        str(tmp_path / "IJBC"),
        "--ijb-target",
        "IJBC",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--batch-size",
        "8",
        "--json",
    ]
    code, stdout, stderr = _evaluate(capsys, *cmd, "--save-scores", str(tmp_path / "scores.csv"))
    assert code == 0, stderr[-3000:]
    table = json.loads(stdout)["ijb"]
    assert table["images"] == 24 and table["templates"] == 12 and table["pairs"] == 66
    assert table["warp"] == "opencv" and table["tar_readout"] == "corners"
    assert list(table["tar_at_far"]) == ["1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"]
    assert all(0.0 <= v <= 1.0 for v in table["tar_at_far"].values())
    # The saved scores reproduce the table, pair for pair in the protocol's order.
    protocol = ijb.IJBProtocol.load(tmp_path / "IJBC", "IJBC")
    saved = np.loadtxt(tmp_path / "scores.csv", delimiter=",", skiprows=1)
    np.testing.assert_array_equal(saved[:, :2], protocol.pairs)
    np.testing.assert_array_equal(saved[:, 2], protocol.labels)
    tar = ijb.tar_at_far(saved[:, 3], saved[:, 2] == 1)
    assert {f"{far:.0e}": v for far, v in tar.items()} == table["tar_at_far"]
    # A rerun reads every feature from the cache: the crops are no longer needed.
    for f in (tmp_path / "IJBC" / "loose_crop").iterdir():
        f.unlink()
    code, stdout, stderr = _evaluate(capsys, *cmd, "--save-scores", str(tmp_path / "scores.npy"))
    assert code == 0, stderr[-3000:]
    rerun = json.loads(stdout)["ijb"]
    assert rerun.pop("scores") == str(tmp_path / "scores.npy") and table.pop("scores") == str(tmp_path / "scores.csv")
    assert rerun == table
    as_npy = np.load(tmp_path / "scores.npy")
    assert as_npy.dtype.names == ("template_1", "template_2", "label", "score")
    np.testing.assert_array_equal(as_npy["score"], saved[:, 3])  # the .csv's 17 digits read back exactly
    # The cache holds opencv-warped features: it refuses to resume with another warp.
    code, _, stderr = _evaluate(capsys, *cmd, "--warp", "exact")
    assert code == 2 and "warp: 'opencv' there, 'exact' now" in stderr, stderr[-2000:]


def test_evaluate_cli_errors(trained, tmp_path, capsys):
    workdir, _ = trained
    for args, message in [
        (["--workdir", str(tmp_path / "none"), "--bin", "synthetic"], "has no checkpoints/ directory"),
        (["--workdir", str(workdir)], "nothing to evaluate"),
        (["--workdir", str(workdir), "--step", "7", "--bin", "synthetic"], "no checkpoint for step 7"),
        (["--workdir", str(workdir), "--bin", str(tmp_path / "lfw.bin")], "lfw.bin does not exist"),
        (["--workdir", str(workdir), "--bin", "lfw"], "lfw.bin does not exist"),  # <data.path>/lfw.bin
        (["--workdir", str(workdir), "--ijb", str(tmp_path)], "loose_crop is missing"),
        (["--workdir", str(workdir), "--bin", "synthetic", "--save-scores", "s.csv"], "give --ijb DIR too"),
    ]:
        code, _, stderr = _evaluate(capsys, *args)
        assert code == 2 and message in stderr, (args, stderr[-2000:])


def test_config_names_a_missing_pair_file(tmp_path):
    from pfc_jax.config_validation import ConfigError, validate

    config = recipes.load("synthetic")
    config.eval.bins = "synthetic, lfw"
    config.eval.dir = str(tmp_path)
    with pytest.raises(ConfigError, match=r"config.eval.bins = .*'lfw' refers to .*lfw.bin, which does not exist"):
        validate(config, num_devices=8)
    (tmp_path / "lfw.bin").write_bytes(b"")
    validate(config, num_devices=8)
