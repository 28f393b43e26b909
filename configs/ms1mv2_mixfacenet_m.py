"""MS1MV2 (faces_emore): 85,742 identities, 5,822,653 images; MixFaceNet-M, ArcFace, full softmax.

The official MixFaceNets training set-up (fdbtrs/mixfacenets, paper section 4): 4 GPUs x
128 = 512 images per step, SGD momentum 0.9, weight decay 5e-4 on the backbone and the
centers, lr 0.1 without warmup, x 0.1 after epochs 7, 13, 19 and 24 of 26 (the code's
milestones; the paper quotes 80k, 140k, 210k and 280k iterations), ArcFace s = 64,
m = 0.5 on 512-d embeddings, Partial FC at rate 1 (every class), gradient clipping at
norm 5, float32. For MixFaceNet-S / -XS or the Shuffle variants, set
--config.model.name=mixfacenet_s (..._xs, shufflemixfacenet_m, ...).

    python -m pfc_jax.main --config configs/ms1mv2_mixfacenet_m.py --workdir /runs/ms1mv2_mixfacenet_m \
        --config.data.path=/data/faces_emore
"""

import pathlib
import runpy

base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    c = base["get_config"]()
    c.global_batch_size = 512
    c.num_epochs = 26.0
    c.model.name = "mixfacenet_m"
    c.head.sample_rate = 1.0
    c.head.margin.s = 64.0
    c.head.margin.m1 = 1.0
    c.head.margin.m2 = 0.5
    c.head.margin.m3 = 0.0
    c.head.weight_decay = 5e-4
    c.optimizer.lr = 0.1
    c.optimizer.weight_decay = 5e-4
    c.schedule.name = "step"
    c.schedule.milestones = (7, 13, 19, 24)
    c.schedule.decay_factor = 0.1
    c.data.source = "recordio"
    c.data.path = ""  # required: --config.data.path=...
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5000
    return c
