"""WebFace42M: 2,059,906 identities, 42,474,557 images; ViT-S, CosFace, Partial FC at rate 0.3, AdamW.

arcface_torch's ViT recipe (wf42m_pfc03_40epoch_64gpu_vit_s): 64 GPUs x 384 images =
24,576 per step, AdamW (lr 1e-3, weight decay 0.1 on every parameter and on the class
centers), 4 warmup epochs then a linear decay to 0 over 40 epochs, CosFace s = 64,
m = 0.4 on 512-d embeddings, gradient clipping at norm 5; its fp16 is bfloat16 here. The
model is arcface_torch's vit_s_dp005_mask_0 (drop path 0.05, no patch dropout). On fewer
devices keep the global batch with --config.grad_accum_steps (the 8-GPU ViT-B recipe
accumulates 12 steps of 8 x 256), or scale the learning rate with the batch.

    python -m pfc_jax.main --config configs/webface42m_vit_s.py --workdir /runs/webface42m_vit_s \
        --config.data.path=/data/WebFace42M
"""

import pathlib
import runpy

base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    c = base["get_config"]()
    c.global_batch_size = 24576
    c.num_epochs = 40.0
    c.dtype = "bfloat16"
    c.model.name = "vit_s"
    c.head.sample_rate = 0.3
    c.head.margin.s = 64.0
    c.head.margin.m1 = 1.0
    c.head.margin.m2 = 0.0
    c.head.margin.m3 = 0.4
    c.head.margin.gradient = "straight_through"  # arcface_torch: margin under no_grad
    c.head.margin.past_critical = "cos"
    c.head.weight_decay = 0.1  # one AdamW over the backbone and the centers
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.1
    c.optimizer.clip_grad_norm = 5.0
    c.schedule.name = "polynomial"
    c.schedule.power = 1.0  # linear decay to 0 (arcface_torch's PolynomialLRWarmup)
    c.schedule.warmup_epochs = 4.0
    c.data.source = "recordio"
    c.data.path = ""  # required: --config.data.path=...
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    return c
