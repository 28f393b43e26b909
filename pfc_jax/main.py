"""Train a face-recognition model.

    python -m pfc_jax.main --config configs/synthetic.py --workdir /tmp/pfc_demo
    python -m pfc_jax.main --config configs/ms1mv3_r50.py --workdir /runs/r50 \\
        --config.data.path=/data/ms1m-retinaface-t1 --config.head.sample_rate=0.3

A workdir that already holds a checkpoint is resumed. This file only parses flags;
the loop is :func:`pfc_jax.train.train_and_evaluate`.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<name>.py); override fields with --config.<field>=value.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every checkpoint detail at INFO; --verbosity=0 brings it back.
        logging.set_verbosity(logging.WARNING)
    # Imported here so that --help and flag errors don't pay for importing JAX.
    from pfc_jax import checkpoint, train
    from pfc_jax.config_validation import ConfigError
    from pfc_jax.data.recordio import RecordIOError
    from pfc_jax.data.sources import SourceError

    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, checkpoint.CheckpointError, SourceError, RecordIOError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except train.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
