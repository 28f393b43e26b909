"""MS1MV3 (ms1m-retinaface-t1): 93,431 identities, 5,179,510 images; iResNet-50, ArcFace.

The arcface_torch recipe for this dataset (8 GPUs x 128 images, SGD, polynomial decay),
in bfloat16, with arcface_torch's margin semantics: a straight-through gradient and the
target value as arcface_torch computes it (cos(m1*theta + m2) - m3 everywhere, no special
branch past the critical angle).

The dataset path has no default: point it at the folder with train.rec, train.idx and
property:

    python -m pfc_jax.main --config configs/ms1mv3_r50.py --workdir /runs/ms1mv3_r50 \
        --config.data.path=/data/ms1m-retinaface-t1
"""

import pathlib
import runpy

base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    c = base["get_config"]()
    c.global_batch_size = 1024
    c.num_epochs = 25.0
    c.dtype = "bfloat16"
    c.model.name = "iresnet50"
    c.head.sample_rate = 1.0
    c.head.margin.m1 = 1.0
    c.head.margin.m2 = 0.5
    c.head.margin.m3 = 0.0
    c.head.margin.gradient = "straight_through"  # arcface_torch: margin under no_grad
    c.head.margin.past_critical = "cos"  # arcface_torch: cos(theta + m2) via arccos, no branch
    c.head.weight_decay = 5e-4
    c.optimizer.lr = 0.2
    c.optimizer.weight_decay = 5e-4
    c.schedule.warmup_epochs = 2.0
    c.data.source = "recordio"
    c.data.path = ""  # required: --config.data.path=...
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5000
    return c
