"""The quality study's benchmark: a narrow iResNet on the hard long-tailed synthetic world.

20,000 identities with a Pareto law of images per identity (70 % have 2-5 images, ~270
have 100+), look-alike families, pose / light / occlusion / blur / noise; 32x32 images.
One arm x one seed is sized to finish in under 10 minutes on a 2-core CPU:

    python -m pfc_jax.study --config configs/study.py \
        --arms partial_fc:rate=1.0,partial_fc:rate=0.1,partial_fc:rate=0.01 --seeds 2 --out /tmp/study

``--quick`` (tests, smoke runs) shrinks it to a few hundred identities and steps. Also a
plain training recipe: ``python -m pfc_jax.main --config configs/study.py --workdir DIR``.
"""

import pathlib
import runpy

# The base declares every field; loaded by path so this file works from any directory.
base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    c = base["get_config"]()
    c.global_batch_size = 128
    c.total_steps = 2000
    c.model.name = "iresnet_narrow"
    c.model.embedding_dim = 128
    c.head.sample_rate = 1.0
    c.head.margin.s = 32.0
    c.head.margin.m2 = 0.3
    c.optimizer.lr = 0.1
    c.schedule.warmup_epochs = 0.2
    c.data.source = "hard_synthetic"
    c.data.image_size = 32
    c.data.threads = 4
    c.data.augment.flip = 0.5
    c.eval.bins = "synthetic"  # 6,000 pairs of held-out identities (data.hard_synthetic_eval)
    c.eval.every_steps = 500
    c.eval.batch_size = 512
    c.log_every_steps = 100
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 1
    c.tensorboard = False
    return c
