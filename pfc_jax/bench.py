"""Throughput and memory benchmarks.

    python -m pfc_jax.bench head --classes 1000000 --batch 256 --dim 512 --rate 0.1
    python -m pfc_jax.bench train --config configs/synthetic.py
    python -m pfc_jax.bench data --source rec:/data/ms1m-retinaface-t1 --workers 4

``head`` times one whole Partial FC head step (sample, gather, forward, backward, sparse
optimizer update) on a fixed batch of embeddings, with a new sampling key every step.
It prints the median / min / max milliseconds per step, the per-device sizes that
dominate memory (centers + optimizer rows, the logits) and the peak device memory where
the backend reports it (GPU/TPU), else XLA's compiled estimate.

``train`` times the whole train step of a config (backbone forward/backward, head,
both optimizer updates) on a fixed synthetic batch, and the backbone alone (forward,
backward and its optimizer, no head) on the same batch: the ratio is the head's
overhead. Both report XLA's compiled memory and the device's peak (the backbone runs
first, so its peak is its own). Flags override the config's classes, sample rate, backbone, batch and dtype.

``data`` times the input pipeline alone (read, JPEG decode, augment, batch) and reports
images/s and images per CPU-second (all of the process's and its workers' CPU time).
Without ``--source`` it writes a temporary synthetic RecordIO dataset of 112x112 JPEGs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m pfc_jax.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    head = sub.add_parser("head", help="time the Partial FC head step")
    head.add_argument("--classes", type=int, required=True, help="number of identities C")
    head.add_argument("--batch", type=int, default=256, help="global batch B")
    head.add_argument("--dim", type=int, default=512, help="embedding size D")
    head.add_argument("--rate", type=float, default=0.1, help="sample rate in [0, 1]")
    head.add_argument(
        "--devices", type=int, default=None, help="devices to shard over (default: all; on CPU, fakes this many)"
    )
    head.add_argument("--steps", type=int, default=10, help="timed steps")
    head.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    head.add_argument(
        "--optimizer", choices=("sgd", "adamw"), default="sgd", help="sgd: momentum 0.9, wd 5e-4 (the field's recipe)"
    )
    head.add_argument("--margin", choices=("arcface", "cosface"), default="arcface")
    head.add_argument("--logits-dtype", choices=("float32", "bfloat16"), default="float32")
    head.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    train = sub.add_parser("train", help="time the full train step of a config")
    train.add_argument("--config", required=True, help="config file, e.g. configs/synthetic.py")
    train.add_argument("--classes", type=int, default=None, help="number of identities (default: the config's dataset)")
    train.add_argument("--rate", type=float, default=None, help="sample rate (default: the config's)")
    train.add_argument("--backbone", default=None, help="backbone name (default: the config's)")
    train.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    train.add_argument("--dtype", choices=("float32", "bfloat16", "bf16"), default=None)
    train.add_argument(
        "--devices", type=int, default=None, help="devices to use (default: all; on CPU, fakes this many)"
    )
    train.add_argument("--steps", type=int, default=10)
    train.add_argument("--warmup", type=int, default=2)
    train.add_argument("--json", action="store_true")
    data = sub.add_parser("data", help="time the input pipeline")
    data.add_argument(
        "--source",
        default=None,
        help="rec:DIR | folder:DIR | tfds:NAME@DATA_DIR | synthetic (default: a temporary RecordIO of JPEGs)",
    )
    data.add_argument("--workers", type=int, default=0, help="worker processes (0: threads in this process)")
    data.add_argument("--threads", type=int, default=2, help="reader threads per process")
    data.add_argument("--batch", type=int, default=256)
    data.add_argument("--batches", type=int, default=20, help="timed batches")
    data.add_argument(
        "--augment",
        choices=("flip", "all"),
        default="flip",
        help="flip: the default; all: every augmentation with probability 0.5",
    )
    data.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "data":
        for name in ("threads", "batch", "batches"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be >= 1")
        if args.workers < 0:
            parser.error("--workers must be >= 0")
    if args.command == "train":
        for name in ("classes", "batch", "devices"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                parser.error(f"--{name} must be >= 1")
        if args.steps < 1:
            parser.error("--steps must be >= 1")
        if args.rate is not None and not 0.0 <= args.rate <= 1.0:
            parser.error("--rate must be in [0, 1]")
    if args.command == "head":
        for name in ("classes", "batch", "dim", "steps"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be >= 1")
        if not 0.0 <= args.rate <= 1.0:
            parser.error("--rate must be in [0, 1]")
        if args.devices is not None and args.devices < 1:
            parser.error("--devices must be >= 1")
    return args


def _select_devices(requested):
    """The first ``requested`` devices; on CPU, asks JAX for that many fake ones first."""
    import jax

    if requested is not None and jax.config.jax_platforms in (None, "", "cpu"):
        # Must happen before the CPU backend starts; harmless on other platforms.
        try:
            jax.config.update("jax_num_cpu_devices", requested)
        except RuntimeError:
            pass  # backend already up (e.g. called from a test): use what is there
    devices = jax.devices()
    if requested is None:
        return devices
    if requested > len(devices):
        raise SystemExit(f"--devices {requested}: only {len(devices)} {devices[0].platform} device(s) available")
    return devices[:requested]


def _device_peak_bytes(devices):
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if not stats or "peak_bytes_in_use" not in stats:
            return None
        peaks.append(stats["peak_bytes_in_use"])
    return max(peaks)


def bench_head(args) -> dict:
    import jax
    import jax.numpy as jnp

    from pfc_jax import optim, sharding
    from pfc_jax.heads import margins
    from pfc_jax.heads.partial_fc import PartialFC

    devices = _select_devices(args.devices)
    mesh = sharding.make_mesh(devices)
    if args.batch % len(devices):
        raise SystemExit(f"--batch {args.batch} must be a multiple of --devices {len(devices)}")
    tx = optim.sgd(0.1, 0.9, 5e-4) if args.optimizer == "sgd" else optim.adamw(1e-3)
    head = PartialFC(
        mesh,
        num_classes=args.classes,
        embedding_dim=args.dim,
        sample_rate=args.rate,
        margin=margins.arcface() if args.margin == "arcface" else margins.cosface(),
        optimizer=tx,
        logits_dtype=jnp.dtype(args.logits_dtype),
    )
    k_state, k_emb, k_lab, k_step = jax.random.split(jax.random.key(0), 4)
    batch = sharding.batch_sharding(mesh)
    state = head.init(k_state)
    embeddings = jax.device_put(jax.random.normal(k_emb, (args.batch, args.dim)), batch)
    labels = jax.device_put(jax.random.randint(k_lab, (args.batch,), 0, args.classes), batch)

    step = head.jit_step()
    start = time.perf_counter()
    compiled = step.lower(state, embeddings, labels, k_step).compile()
    compile_s = time.perf_counter() - start

    losses, times = [], []
    for i in range(args.warmup + args.steps):
        key = jax.random.fold_in(k_step, i)
        start = time.perf_counter()
        state, grad, metrics = compiled(state, embeddings, labels, key)
        jax.block_until_ready((state, grad, metrics))
        if i >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
        losses.append(float(metrics["loss"]))

    memory = compiled.memory_analysis()
    num_sample = head.num_sample(args.batch)
    row_leaves = sum(1 for leaf in jax.tree.leaves(state.opt_state) if leaf.shape == state.centers.shape)
    return {
        "benchmark": "head",
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "classes": args.classes,
        "batch": args.batch,
        "dim": args.dim,
        "rate": args.rate,
        "optimizer": args.optimizer,
        "logits_dtype": args.logits_dtype,
        "num_local": head.num_local,
        "num_sample": num_sample,
        "steps": args.steps,
        "ms_per_step": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "compile_s": compile_s,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        # Per device: what dominates memory.
        "centers_and_state_bytes": head.num_local * args.dim * 4 * (1 + row_leaves),
        "logits_bytes": args.batch * num_sample * 4,
        **_compiled_bytes(memory),
        "peak_bytes": _device_peak_bytes(devices),
    }


def _time(fn, state, *args, warmup: int, steps: int):
    """Runs ``state = fn(state, *args)[0]`` warmup + steps times; (state, ms per step list)."""
    import jax

    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        out = fn(state, *args)
        jax.block_until_ready(out)
        state = out[0]
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return state, times


def bench_train(args) -> dict:
    import pathlib
    import runpy

    import jax
    import numpy as np

    from pfc_jax import sharding, train
    from pfc_jax.config_validation import validate

    devices = _select_devices(args.devices)
    mesh = sharding.make_mesh(devices)
    config = runpy.run_path(str(pathlib.Path(args.config)))["get_config"]()
    if args.rate is not None:
        config.head.sample_rate = args.rate
    if args.backbone is not None:
        config.model.name = args.backbone
    if args.batch is not None:
        config.global_batch_size = args.batch
    if args.dtype is not None:
        config.dtype = "bfloat16" if args.dtype == "bf16" else args.dtype
    config.total_steps = config.total_steps or 1000
    config.data.source, config.data.path = "synthetic", ""  # never read a dataset here
    validate(config, num_devices=len(devices))
    num_classes = args.classes or config.data.synthetic.num_identities
    setup = train.build(config, mesh, num_classes=num_classes, num_examples=10 * config.global_batch_size)
    trainer = setup.trainer
    # The state without the head: the backbone alone is measured before the centers exist,
    # so that the device's peak memory after it is its own (the peak only grows).
    shardings = trainer.state_shardings(setup.params, setup.batch_stats)._replace(head=None)
    without_head = lambda *a: trainer.init_state(*a)._replace(head=None)
    state = jax.jit(without_head, out_shardings=shardings)(setup.params, setup.batch_stats, jax.random.key(config.seed))

    rng = np.random.default_rng(0)
    b, size = config.global_batch_size, config.data.image_size
    batch = sharding.batch_sharding(mesh)
    images = jax.device_put(rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8), batch)
    labels = jax.device_put(rng.integers(0, num_classes, b).astype(np.int32), batch)

    # The backbone alone: forward, backward (of a stand-in loss) and its optimizer.
    def backbone_step(state, images):
        def loss(params):
            key = jax.random.key(0)
            embeddings, stats = trainer.embed(params, state.batch_stats, images, key)
            return jax.numpy.mean(jax.numpy.square(embeddings.astype(jax.numpy.float32))), stats

        grads, stats = jax.grad(loss, has_aux=True)(state.params)
        updates, opt_state = trainer.tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p + u, state.params, updates)
        return state._replace(params=params, batch_stats=stats, opt_state=opt_state), None

    backbone = (
        jax.jit(backbone_step, in_shardings=(shardings, batch), out_shardings=(shardings, None), donate_argnums=(0,))
        .lower(state, images)
        .compile()
    )
    state, backbone_ms = _time(backbone, state, images, warmup=args.warmup, steps=args.steps)
    peak_backbone = _device_peak_bytes(devices)
    backbone_memory = {f"backbone_{k}": v for k, v in _compiled_bytes(backbone.memory_analysis()).items()}
    state = state._replace(head=trainer.head.init(jax.random.key(config.seed + 1)))

    start = time.perf_counter()
    full = trainer.jit(setup.params, setup.batch_stats).lower(state, images, labels).compile()
    compile_s = time.perf_counter() - start
    memory = full.memory_analysis()
    state, full_ms = _time(full, state, images, labels, warmup=args.warmup, steps=args.steps)
    peak_full = _device_peak_bytes(devices)

    full_med, backbone_med = statistics.median(full_ms), statistics.median(backbone_ms)
    return {
        "benchmark": "train",
        "config": args.config,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "backbone": config.model.name,
        "dtype": config.dtype,
        "classes": num_classes,
        "rate": config.head.sample_rate,
        "batch": b,
        "steps": args.steps,
        "ms_per_step": full_med,
        "samples_per_sec": b / full_med * 1e3,
        "backbone_ms_per_step": backbone_med,
        "backbone_samples_per_sec": b / backbone_med * 1e3,
        "head_overhead": full_med / backbone_med - 1.0,
        "compile_s": compile_s,
        **_compiled_bytes(memory),
        "peak_bytes": peak_full,
        **backbone_memory,
        "backbone_peak_bytes": peak_backbone,
    }


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its live descendants (Linux /proc)."""
    import os

    total = sum(os.times()[:2])
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        children = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append((int(pid), (int(fields[11]) + int(fields[12])) / ticks))
        stack = [os.getpid()]
        while stack:
            for pid, seconds in children.get(stack.pop(), []):
                total += seconds
                stack.append(pid)
    except (OSError, ValueError):
        pass
    return total


def bench_data(args) -> dict:
    import os
    import shutil
    import tempfile

    from pfc_jax.data import pipeline, synth
    from pfc_jax.data.augment import Augment
    from pfc_jax.data.prepare import open_source
    from pfc_jax.data.sources import TFDSDataset
    from pfc_jax.data.synthetic import SyntheticIdentities

    tmp = None
    spec = args.source
    if spec is None:
        tmp = tempfile.mkdtemp(prefix="pfc_bench_data_")
        synth.write(os.path.join(tmp, "rec"), identities=100, images_per_id=30, pairs=0, progress=False)
        spec = f"rec:{os.path.join(tmp, 'rec')}"
    if spec == "synthetic":
        source = SyntheticIdentities(1000, 50)
    elif spec.startswith("tfds:"):
        name, _, data_dir = spec[5:].partition("@")
        source = TFDSDataset(data_dir, name)
    else:
        source = open_source(spec)
    size = source[0]["image"].shape[0] if "image" in source[0] else 112
    augment = Augment() if args.augment == "flip" else Augment(0.5, 0.5, 0.5, 0.5, 0.5)
    it = pipeline.make_iterator(
        source,
        global_batch=args.batch,
        seed=0,
        image_size=size,
        augment=augment,
        threads=args.threads,
        workers=args.workers,
    )
    for _ in range(3):  # start workers, fill buffers
        next(it)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    for _ in range(args.batches):
        next(it)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    it.close()
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    n = args.batches * args.batch
    return {
        "benchmark": "data",
        "source": args.source or "temporary RecordIO (synthetic 112x112 JPEGs, q95)",
        "images": n,
        "workers": args.workers,
        "threads": args.threads,
        "augment": args.augment,
        "images_per_sec": n / wall,
        "images_per_cpu_sec": n / cpu if cpu > 0 else None,
        "cpu_count": os.cpu_count(),
    }


def _compiled_bytes(memory) -> dict:
    """XLA's per-device estimate: temporaries, and everything live (donated inputs once)."""
    if memory is None:
        return {"compiled_temp_bytes": None, "compiled_total_bytes": None}
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    return {"compiled_temp_bytes": memory.temp_size_in_bytes, "compiled_total_bytes": total}


def _mib(n):
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def main(argv=None) -> None:
    args = _parse(sys.argv[1:] if argv is None else argv)
    r = {"train": bench_train, "head": bench_head, "data": bench_data}[args.command](args)
    if args.json:
        print(json.dumps(r))
    elif args.command == "data":
        print(
            f"data pipeline  {r['source']}, augment={r['augment']}, {r['workers']} worker process(es), "
            f"{r['threads']} thread(s)\n"
            f"  {r['images_per_sec']:,.0f} images/s, {r['images_per_cpu_sec']:,.0f} images per CPU-second "
            f"({r['images']} images; {r['cpu_count']} CPUs)"
        )
    elif args.command == "train":
        print(
            f"train step  {r['backbone']} {r['dtype']}, C={r['classes']:,} rate={r['rate']} "
            f"B={r['batch']} on {r['devices']} x {r['device_kind']} ({r['platform']})\n"
            f"  full step: {r['samples_per_sec']:,.1f} samples/s ({r['ms_per_step']:.1f} ms/step, "
            f"compile {r['compile_s']:.1f} s)\n"
            f"  backbone alone: {r['backbone_samples_per_sec']:,.1f} samples/s "
            f"({r['backbone_ms_per_step']:.1f} ms/step); head overhead {100 * r['head_overhead']:.1f}% "
            f"(full / backbone = {1 + r['head_overhead']:.3f})\n"
            f"  memory per device, full step: compiled total {_mib(r['compiled_total_bytes'])}, "
            f"temporaries {_mib(r['compiled_temp_bytes'])}, peak {_mib(r['peak_bytes'])}\n"
            f"  memory per device, backbone alone: compiled total {_mib(r['backbone_compiled_total_bytes'])}, "
            f"temporaries {_mib(r['backbone_compiled_temp_bytes'])}, peak {_mib(r['backbone_peak_bytes'])}"
        )
    else:
        print(
            f"head step  C={r['classes']:,} B={r['batch']} D={r['dim']} rate={r['rate']} "
            f"on {r['devices']} x {r['device_kind']} ({r['platform']})\n"
            f"  sampled per shard: {r['num_sample']:,} of {r['num_local']:,} rows\n"
            f"  ms/step: median {r['ms_per_step']:.2f}  min {r['ms_min']:.2f}  max {r['ms_max']:.2f}  "
            f"({r['steps']} steps; compile {r['compile_s']:.1f} s)\n"
            f"  per device: centers+optimizer rows {_mib(r['centers_and_state_bytes'])}, "
            f"logits {_mib(r['logits_bytes'])}, compiled temporaries {_mib(r['compiled_temp_bytes'])}, "
            f"compiled total {_mib(r['compiled_total_bytes'])}, peak {_mib(r['peak_bytes'])}\n"
            f"  loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}"
        )


if __name__ == "__main__":
    main()
