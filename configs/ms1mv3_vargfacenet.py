"""MS1MV3 (ms1m-retinaface-t1): 93,431 identities, 5,179,510 images; VarGFaceNet, ArcFace.

VarGFaceNet won the light track of the 2019 Lightweight Face Recognition challenge, whose
training set this is. Its official code has the network only; this recipe is insightface's
arcface_mxnet default with which that code is meant to be trained: SGD momentum 0.9,
weight decay 5e-4, lr 0.1 for 512 images per step (4 GPUs x 128), x 0.1 at 100k, 160k and
220k steps (9.9, 15.8 and 21.7 epochs here), ArcFace s = 64, m = 0.5, 512-d embeddings,
every class in the softmax. The paper's recursive knowledge distillation is not part of it.

    python -m pfc_jax.main --config configs/ms1mv3_vargfacenet.py --workdir /runs/ms1mv3_vargfacenet \
        --config.data.path=/data/ms1m-retinaface-t1
"""

import pathlib
import runpy

base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    c = base["get_config"]()
    c.global_batch_size = 512
    c.num_epochs = 24.0
    c.model.name = "vargfacenet"
    c.head.sample_rate = 1.0
    c.head.margin.s = 64.0
    c.head.margin.m1 = 1.0
    c.head.margin.m2 = 0.5
    c.head.margin.m3 = 0.0
    c.head.weight_decay = 5e-4
    c.optimizer.lr = 0.1
    c.optimizer.weight_decay = 5e-4
    c.optimizer.clip_grad_norm = 0.0  # arcface_mxnet does not clip
    c.schedule.name = "step"
    c.schedule.milestones = (9.885, 15.816, 21.747)  # 100k, 160k, 220k steps of 512 images
    c.schedule.decay_factor = 0.1
    c.data.source = "recordio"
    c.data.path = ""  # required: --config.data.path=...
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5000
    return c
