"""Train a face-recognition model.

    python -m pfc_jax.main --config configs/synthetic.py --workdir /tmp/pfc_demo
    python -m pfc_jax.main --config configs/ms1mv3_r50.py --workdir /runs/r50 \\
        --config.data.path=/data/ms1m-retinaface-t1 --config.head.sample_rate=0.3

A workdir that already holds a checkpoint is resumed. On several hosts every process
runs the same command (launch/ has scripts for SLURM, TPU VM pods and localhost);
SLURM and Cloud TPU jobs are detected, elsewhere add ``--coordinator=HOST:PORT
--num_processes=N --process_id=I`` (see pfc_jax.distributed). The workdir must then be
on a file system every process sees. This file only parses flags; the loop is
:func:`pfc_jax.train.train_and_evaluate`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from pfc_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file (configs/<name>.py); override fields with --config.<field>=value.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator",
    None,
    "Multi-process runs: HOST:PORT of process 0, the same on every process "
    "(default: $JAX_COORDINATOR_ADDRESS; detected on SLURM and Cloud TPU).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes",
    None,
    "Multi-process runs: number of processes (default: $JAX_NUM_PROCESSES; detected on SLURM and Cloud TPU).",
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    None,
    "Multi-process runs: this process's id in [0, num_processes) (default: $JAX_PROCESS_ID).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv  # the flags parser refuses positional arguments
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every checkpoint detail at INFO; --verbosity=0 brings it back.
        logging.set_verbosity(logging.WARNING)

    def body():
        from pfc_jax import distributed

        # Before anything touches a device: the backend is built for all processes at once.
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        # Imported here so that --help and flag errors don't pay for importing JAX.
        from pfc_jax import train

        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)

    cli.guard(body)


if __name__ == "__main__":
    # The config file loads lazily; reading it whole makes a broken one fail while parsing.
    app.run(main, flags_parser=cli.absl_flags_parser("pfc_jax.main", lambda: _CONFIG.value.to_dict()))
