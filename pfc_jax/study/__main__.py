"""Train and compare heads on the same data: one workdir per arm x seed, then a summary.

    python -m pfc_jax.study --config configs/study.py --out /tmp/study --seeds 2 \\
        --arms partial_fc:rate=1.0,partial_fc:rate=0.1,partial_fc:rate=0.01

An arm is ``head[:field=value...]`` (fields of config.head; ``rate`` = sample_rate).
Every arm trains from the same seeds (config.seed + k for seed k) on the same data
stream for the same steps. OUT/<arm>/seed<k>/ is that run's workdir; a rerun of the
same command skips finished runs and resumes unfinished ones from their checkpoints.
Results: OUT/study.json, OUT/study.md (tables) and OUT/study.png (needs matplotlib:
pip install 'pfc_jax[study]'). ``--quick`` shrinks the benchmark for smoke tests.
Override any field with --config.<field>=value, e.g. a real dataset:
--config.data.source=recordio --config.data.path=DIR --config.eval.bins=lfw,cfp_fp.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from pfc_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/study.py); override fields with --config.<field>=value.", lock_config=True
)
_ARMS = flags.DEFINE_string("arms", None, "Comma-separated arms, e.g. partial_fc:rate=1.0,partial_fc:rate=0.1.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per arm (config.seed, config.seed + 1, ...).", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Folder for the runs and the summary.")
_QUICK = flags.DEFINE_boolean("quick", False, "A tiny benchmark (a few hundred identities, tens of steps).")
_STALENESS_IMAGES = flags.DEFINE_integer(
    "staleness_images", 2, "Training images per class embedded for the staleness figures.", lower_bound=1
)
_STALENESS_CLASSES = flags.DEFINE_integer(
    "staleness_classes", 20_000, "At most this many classes (a seeded subset) in the staleness figures.", lower_bound=1
)
flags.mark_flags_as_required(["config", "arms", "out"])

# --quick: applied before the command line's --config.<field> overrides (which still win).
QUICK = {
    "global_batch_size": 32,
    "total_steps": 24,
    "data.image_size": 16,
    "data.threads": 2,
    "data.hard_synthetic.num_identities": 200,
    "data.hard_synthetic.max_images": 20,
    "data.hard_synthetic_eval.pairs": 200,
    "data.hard_synthetic_eval.pair_identities": 40,
    "data.hard_synthetic_eval.tar_identities": 20,
    "data.hard_synthetic_eval.images_each": 3,
    "eval.every_steps": 12,
    "eval.batch_size": 64,
    "log_every_steps": 4,
    "checkpoint_every_steps": 8,
}


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)

    def body():
        from pfc_jax import study

        config = _CONFIG.value
        arms = study.parse_arms(_ARMS.value)  # before anything is trained: a bad arm stops here
        for arm in arms:
            arm.apply(config)
        if _QUICK.value:
            config.update_from_flattened_dict(QUICK)
            config.update_from_flattened_dict(config_flags.get_override_values(flags.FLAGS["config"]))
        options = study.Options(staleness_images=_STALENESS_IMAGES.value, staleness_classes=_STALENESS_CLASSES.value)
        study.run_study(config, arms, _SEEDS.value, _OUT.value, options=options)

    cli.guard(body)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.absl_flags_parser("pfc_jax.study", lambda: _CONFIG.value.to_dict()))
