"""WebFace42M: 2,059,906 identities, 42,474,557 images; iResNet-100, CosFace, Partial FC at rate 0.2.

The arcface_torch recipe for this dataset (8 GPUs x 128 images, SGD, polynomial decay),
in bfloat16, with arcface_torch's margin semantics: a straight-through gradient and the
target value as arcface_torch computes it (cos(m1*theta + m2) - m3 everywhere, no special
branch past the critical angle). For CosFace neither setting changes anything (no angular
margin: the value is cos(theta) - m3 and its slope is 1 either way); they are set so that
switching the recipe to ArcFace keeps arcface_torch's semantics.

The dataset path has no default: point it at the folder with train.rec, train.idx and
property:

    python -m pfc_jax.main --config configs/webface42m_r100.py --workdir /runs/webface42m_r100 \
        --config.data.path=/data/WebFace42M
"""

import pathlib
import runpy

base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    c = base["get_config"]()
    c.global_batch_size = 1024
    c.num_epochs = 20.0
    c.dtype = "bfloat16"
    c.model.name = "iresnet100"
    c.head.sample_rate = 0.2
    c.head.margin.m1 = 1.0
    c.head.margin.m2 = 0.0
    c.head.margin.m3 = 0.4
    c.head.margin.gradient = "straight_through"  # arcface_torch: margin under no_grad
    c.head.margin.past_critical = "cos"  # arcface_torch: cos(theta + m2) via arccos, no branch
    c.head.weight_decay = 5e-4
    c.optimizer.lr = 0.1
    c.optimizer.weight_decay = 5e-4
    c.schedule.warmup_epochs = 0.0
    c.data.source = "recordio"
    c.data.path = ""  # required: --config.data.path=...
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5000
    return c
