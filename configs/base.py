"""Every field of a pfc_jax run, with its default. Recipes start from this and override.

    python -m pfc_jax.main --config configs/synthetic.py --workdir /tmp/pfc_demo \
        --config.head.sample_rate=0.1

Any field can be overridden on the command line as ``--config.<path>=<value>``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.seed = 0  # initialization, class sampling and data order all derive from it
    # Images per optimizer step over all devices and processes (arcface_torch recipes:
    # 128 per GPU x 8 GPUs = 1024). Must be a multiple of grad_accum_steps x devices.
    c.global_batch_size = 1024
    c.grad_accum_steps = 1  # micro-batches per step; gradients are averaged over them
    c.num_epochs = 20.0  # run length in passes over the dataset (used when total_steps = 0)
    c.total_steps = 0  # > 0: run length in steps, overriding num_epochs
    # > 0: save a checkpoint and exit after this step (time-limited jobs); the LR
    # schedule still spans the whole run, and the next start resumes from there.
    c.stop_at_step = 0
    c.dtype = "float32"  # backbone compute dtype, pfc_jax.models.DTYPES (loss, master weights fp32)

    # Backbone (pfc_jax.models.BACKBONES).
    c.model = ml_collections.ConfigDict()
    c.model.name = "iresnet50"
    c.model.embedding_dim = 512
    c.model.dropout = 0.0  # before the final FC (iResNet only)

    # Classification head over all identities (pfc_jax.heads.HEADS); the fields below are
    # Partial FC's.
    c.head = ml_collections.ConfigDict()
    c.head.name = "partial_fc"
    c.head.sample_rate = 1.0  # fraction of class centers per step; 1.0 = full softmax
    c.head.weight_decay = 5e-4  # weight decay of the class centers (sampled rows only)
    c.head.logits_dtype = "float32"  # dtype of the logits matmul's operands (pfc_jax.models.DTYPES)
    c.head.count_samples = False  # count per class the steps it was sampled (pfc_jax.study sets it)
    # Combined margin s * (cos(m1*theta + m2) - m3): ArcFace (1, 0.5, 0), CosFace (1, 0, 0.4).
    c.head.margin = ml_collections.ConfigDict()
    c.head.margin.s = 64.0
    c.head.margin.m1 = 1.0
    c.head.margin.m2 = 0.5
    c.head.margin.m3 = 0.0
    # exact: differentiate the margin; straight_through: the gradient of cos(theta), as
    # arcface_torch (which applies the margin under no_grad).
    c.head.margin.gradient = "exact"
    # Target value past m1*theta + m2 = pi. monotone: continued linearly in cos(theta) so a
    # larger angle never gives a larger logit; cos: cos(m1*theta + m2) there too, as
    # arcface_torch computes it (rising again). No effect without an angular margin (CosFace).
    c.head.margin.past_critical = "monotone"
    c.head.margin.interclass_filtering_threshold = 0.0  # 0 disables

    # Optimizer for the backbone; the centers use the same kind and learning rate.
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # pfc_jax.optim.OPTIMIZERS
    c.optimizer.lr = 0.1  # peak learning rate
    c.optimizer.momentum = 0.9  # sgd
    c.optimizer.nesterov = False  # sgd
    c.optimizer.weight_decay = 5e-4  # backbone; sgd: coupled L2, adamw: decoupled
    c.optimizer.b1 = 0.9  # adamw
    c.optimizer.b2 = 0.999  # adamw
    c.optimizer.eps = 1e-8  # adamw
    c.optimizer.clip_grad_norm = 5.0  # global-norm clipping of backbone gradients; 0 disables

    # Learning-rate schedule: linear warmup from 0, then decay to end_lr_factor * lr.
    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "polynomial"  # pfc_jax.optim.SCHEDULES
    c.schedule.warmup_epochs = 0.0
    c.schedule.power = 2.0  # polynomial: arcface_torch's PolyScheduler uses 2
    c.schedule.end_lr_factor = 0.0

    # Data (pfc_jax.data): a source, then the grain pipeline.
    c.data = ml_collections.ConfigDict()
    # pfc_jax.data.sources.SOURCES: synthetic; recordio (insightface train.rec/.idx/property
    # folder); tfds (built by python -m pfc_jax.data.prepare); folder (root/<identity>/<images>)
    c.data.source = "synthetic"
    c.data.path = ""  # dataset folder; for tfds the TFDS data_dir
    c.data.tfds_name = ""  # tfds: the dataset name given to pfc_jax.data.prepare
    c.data.image_size = 112  # aligned faces, square
    c.data.threads = 8  # reader threads per process (decoding releases the GIL)
    c.data.workers = 0  # extra worker processes per host for decoding; 0 = threads only
    c.data.sampler = "uniform"  # pfc_jax.data.pipeline.SAMPLERS (identity_balanced: P ids x K images)
    c.data.images_per_identity_in_batch = 4  # K of identity_balanced
    c.data.augment = ml_collections.ConfigDict()  # probabilities
    c.data.augment.flip = 0.5  # horizontal flip
    c.data.augment.blur = 0.0  # Gaussian blur
    c.data.augment.downup = 0.0  # downscale to 25-75% and back (low resolution)
    c.data.augment.color_jitter = 0.0  # brightness / contrast / saturation +-20%
    c.data.augment.grayscale = 0.0
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.num_identities = 1000
    c.data.synthetic.images_per_identity = 50
    c.data.synthetic.seed = 0  # which synthetic world (independent of c.seed)
    # The hard long-tailed benchmark (data.source = "hard_synthetic", configs/study.py);
    # see pfc_jax.data.hard_synthetic for what each field does.
    c.data.hard_synthetic = ml_collections.ConfigDict()
    c.data.hard_synthetic.num_identities = 20_000
    c.data.hard_synthetic.min_images = 2  # images per identity: Pareto law from min_images ...
    c.data.hard_synthetic.max_images = 300  # ... clipped here
    c.data.hard_synthetic.tail = 1.1  # Pareto exponent (smaller: a longer tail)
    c.data.hard_synthetic.family_size = 4  # look-alike identities per family (1: none)
    c.data.hard_synthetic.family_spread = 0.5  # distance between look-alikes (0: identical)
    c.data.hard_synthetic.blobs = 8
    c.data.hard_synthetic.rotation = 15.0  # degrees, +-
    c.data.hard_synthetic.scale = 0.1  # relative, +-
    c.data.hard_synthetic.shift = 0.08  # of the image size, +-
    c.data.hard_synthetic.light = 0.3  # gain / offset / light-gradient strength
    c.data.hard_synthetic.occlusion = 0.3  # probability of an occluding patch
    c.data.hard_synthetic.blur = 0.3  # probability of a blur
    c.data.hard_synthetic.noise = 0.04  # pixel noise std
    c.data.hard_synthetic.seed = 0  # which world (independent of c.seed)
    # Its held-out identities (eval.bins = "synthetic" and the study's 1:1 set).
    c.data.hard_synthetic_eval = ml_collections.ConfigDict()
    c.data.hard_synthetic_eval.pairs = 6000  # 10 folds, half positive, half the negatives look-alikes
    c.data.hard_synthetic_eval.pair_identities = 2000
    c.data.hard_synthetic_eval.tar_identities = 300  # all-vs-all: TAR at FAR 1e-3 / 1e-4
    c.data.hard_synthetic_eval.images_each = 8

    # Verification during training (pfc_jax.evaluation): flip-summed embeddings, 10 folds.
    c.eval = ml_collections.ConfigDict()
    # Comma-separated pair sets: a name ("lfw, cfp_fp, agedb_30") is <eval.dir>/<name>.bin,
    # a path ending in .bin is that file, "synthetic" is held-out identities of the
    # synthetic world trained on (data.source synthetic or hard_synthetic).
    c.eval.bins = ""
    c.eval.dir = ""  # where named .bin files are; "" = data.path
    c.eval.every_steps = 2000  # and at the last step; 0 = only at the last step
    c.eval.batch_size = 256  # images per forward over all devices

    # Logging and checkpoints.
    c.log_every_steps = 50  # console, metrics.jsonl, TensorBoard
    c.checkpoint_every_steps = 2000  # plus one at the end and on SIGTERM
    c.keep_checkpoints = 3
    c.tensorboard = True
    return c
