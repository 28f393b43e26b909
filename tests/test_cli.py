"""Every command follows one convention (pfc_jax/cli.py): bad input or usage -> one
``error:`` line on stderr, exit 2, no traceback; a failed run -> exit 1."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parents[1]
SYNTHETIC = str(ROOT / "configs" / "synthetic.py")


def _cases(tmp: pathlib.Path):
    missing = str(tmp / "no_such_workdir")
    return {
        # command: (with a bad argument, with a missing workdir / input)
        "main": (
            ["--config", SYNTHETIC, "--workdir", str(tmp / "w"), "--no_such_flag=1"],
            ["--config", SYNTHETIC],
        ),
        "evaluate": (["--workdir", missing, "--step", "-1"], ["--workdir", missing, "--bin", "synthetic"]),
        "export": (
            ["--workdir", missing, "--output", "m.onnx", "--step", "x"],
            ["--workdir", missing, "--output", str(tmp / "m.onnx")],
        ),
        "embed": (
            ["--workdir", missing, "--images", str(tmp), "--out", "f.npy", "--batch-size", "0"],
            ["--workdir", missing, "--images", str(ROOT / "tests" / "fixtures"), "--out", str(tmp / "f.npy")],
        ),
        "bench": (["head", "--classes", "0"], ["train", "--config", str(tmp / "no_such_recipe.py")]),
        "data.prepare": (
            ["--source", "rec:" + missing],
            ["--source", "rec:" + missing, "--name", "x", "--data-dir", str(tmp)],
        ),
        "data.synth": (["--out", str(tmp / "s"), "--identities", "-3", "--images-per-id", "2"], ["--identities", "2"]),
        "data.recordio": (["rebuild", missing], ["check", missing]),
        "convert": (
            ["from-arcface-torch", "--model", "iresnet18", "--workdir", str(tmp / "cw")],
            [
                "from-arcface-torch",
                "--backbone",
                missing + ".pth",
                "--model",
                "iresnet18",
                "--workdir",
                str(tmp / "cw"),
            ],
        ),
        "data.prune": (
            ["--source", "rec:" + missing, "--workdir", missing, "--keep-ratio", "2", "--out", str(tmp / "po")],
            ["--source", "rec:" + missing, "--workdir", missing, "--threshold", "0.9", "--out", str(tmp / "po")],
        ),
        "study": (
            ["--config", str(ROOT / "configs" / "study.py"), "--out", str(tmp / "s"), "--arms", "partial_fc:rte=1"],
            ["--config", str(tmp / "nope.py"), "--out", str(tmp / "s"), "--arms", "partial_fc"],
        ),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case at once (2 cores: the processes overlap their start-up)."""
    tmp = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {}
    for command, pair in _cases(tmp).items():
        for kind, args in zip(("bad argument", "missing input"), pair):
            procs[command, kind] = subprocess.Popen(
                [sys.executable, "-m", f"pfc_jax.{command}", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=tmp,
                env=env,
            )
    return {key: (p.wait(timeout=300), p.stderr.read()) for key, p in procs.items()}


@pytest.mark.parametrize("command", list(_cases(pathlib.Path("/tmp"))))
@pytest.mark.parametrize("kind", ["bad argument", "missing input"])
def test_bad_input_exits_2_with_one_error_line(results, command, kind):
    code, stderr = results[command, kind]
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), stderr[-2000:]
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]], stderr[-2000:]


def test_messages_name_the_problem(results):
    assert "no_such_flag" in results["main", "bad argument"][1]
    assert "--workdir" in results["main", "missing input"][1]
    assert "has no checkpoints/ directory" in results["evaluate", "missing input"][1]
    assert "argument --step: must be >= 0" in results["evaluate", "bad argument"][1]
    assert "expected an integer, got 'x'" in results["export", "bad argument"][1]
    assert "no_such_recipe.py: no such file" in results["bench", "missing input"][1]
    assert "invalid choice: 'rebuild'" in results["data.recordio", "bad argument"][1]
    assert "no_such_workdir" in results["data.recordio", "missing input"][1]
    assert "config.head has no field 'rte'" in results["study", "bad argument"][1]
    assert "nope.py" in results["study", "missing input"][1]


@pytest.mark.parametrize("command", list(_cases(pathlib.Path("/tmp"))))
def test_help_exits_0(command):
    """--help succeeds; every command but export (which imports its converter) answers
    without importing JAX."""
    code = (
        "import sys, runpy; sys.argv = ['x', '--help']\n"
        f"try:\n    runpy.run_module('pfc_jax.{command}', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        f"assert {command == 'export'} or 'jax' not in sys.modules, 'jax was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower() or "flags" in out.stdout.lower(), out.stdout[-2000:]


def test_bad_data_exits_2(tmp_path, capsys):
    """Problems found in the data (not in the flags) follow the same rule."""
    import pickle

    from pfc_jax import evaluate
    from pfc_jax.data import prepare, synth
    from tests.cli_helpers import exits_with

    with exits_with(capsys, "verification pairs need >= 2 held-out identities"):
        synth.main(
            ["--out", str(tmp_path / "s"), "--identities", "4", "--images-per-id", "2", "--holdout-identities", "1"]
        )
    synth.write(str(tmp_path / "rec"), identities=4, images_per_id=2, image_size=16, pairs=0, progress=False)
    with exits_with(capsys, "dataset name 'Bad-Name' must be lower_snake_case"):
        prepare.main(
            ["--source", f"rec:{tmp_path / 'rec'}", "--name", "Bad-Name", "--data-dir", str(tmp_path / "tfds")]
        )
    with open(tmp_path / "five.bin", "wb") as f:  # too few pairs for 10 folds
        pickle.dump(([synth.encode_jpeg(np.zeros((16, 16, 3), np.uint8))] * 10, [True, False] * 2 + [True]), f)
    workdir = ROOT / "tests" / "fixtures" / "workdir_v0"
    with exits_with(capsys, "5 pairs cannot be split into 10 folds"):
        evaluate.main(["--workdir", str(workdir), "--bin", str(tmp_path / "five.bin")])
    # Outputs that cannot be written are refused before the work, not after it.
    from pfc_jax import embed, export

    with exits_with(capsys, "five.bin is a file, not a folder"):
        export.main(["--workdir", str(workdir), "--output", str(tmp_path / "five.bin" / "m.onnx")])
    with exits_with(capsys, "--out /proc/feats.npy: cannot write in /proc"):
        embed.main(["--workdir", str(workdir), "--images", str(tmp_path), "--out", "/proc/feats.npy"])


def test_main_misspelled_field_keeps_the_hint(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pfc_jax.main", "--config", SYNTHETIC, "--workdir", str(tmp_path / "w"),
         "--config.head.sampel_rate=0.1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert 'Did you mean "sample_rate"' in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "w").exists()  # nothing written
    out = subprocess.run(
        [sys.executable, "-m", "pfc_jax.main", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert "nope.py" in out.stderr and not (tmp_path / "w").exists()


def _help(capsys, main, *argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code in (0, None)
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_help_shows_every_default(capsys, monkeypatch):
    from pfc_jax import bench, embed
    from pfc_jax.data import recordio, synth

    monkeypatch.setenv("COLUMNS", "100")
    head = _help(capsys, bench.main, "head")
    assert "--batch BATCH global batch B (default: 256)" in head
    assert "--margin {arcface,cosface} (default: arcface)" in head  # an option without a help text
    assert "--devices DEVICES devices to shard over (default: all; on CPU, fakes this many) --" in head
    assert "(default: None)" not in head and "(default: False)" not in head  # not for flags or "not given"
    text = _help(capsys, synth.main)
    assert "--image-size IMAGE_SIZE (default: 112)" in text and "JPEG quality (default: 95)" in text
    assert "--identities IDENTITIES --images-per-id" in text  # required: no default
    assert "--prefix PREFIX (default: train)" in _help(capsys, recordio.main)
    text = _help(capsys, embed.main)
    assert "images per forward (default: 64)" in text and "default 64" not in text
