"""Throughput and memory benchmarks.

    python -m pfc_jax.bench head --classes 1000000 --batch 256 --dim 512 --rate 0.1

``head`` times one whole Partial FC head step (sample, gather, forward, backward, sparse
optimizer update) on a fixed batch of embeddings, with a new sampling key every step.
It prints the median / min / max milliseconds per step, the per-device sizes that
dominate memory (centers + optimizer rows, the logits) and the peak device memory where
the backend reports it (GPU/TPU), else XLA's compiled estimate.
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
    head.add_argument("--devices", type=int, default=None, help="devices to shard over (default: all; on CPU, fakes this many)")
    head.add_argument("--steps", type=int, default=10, help="timed steps")
    head.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    head.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="sgd: momentum 0.9, wd 5e-4 (the field's recipe)")
    head.add_argument("--margin", choices=("arcface", "cosface"), default="arcface")
    head.add_argument("--logits-dtype", choices=("float32", "bfloat16"), default="float32")
    head.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
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
        raise SystemExit(
            f"--devices {requested}: only {len(devices)} {devices[0].platform} device(s) available"
        )
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
    row_leaves = sum(
        1 for leaf in jax.tree.leaves(state.opt_state) if leaf.shape == state.centers.shape
    )
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
        "compiled_temp_bytes": memory.temp_size_in_bytes if memory else None,
        "compiled_total_bytes": (
            memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes
        ) if memory else None,
        "peak_bytes": _device_peak_bytes(devices),
    }


def _mib(n):
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def main(argv=None) -> None:
    args = _parse(sys.argv[1:] if argv is None else argv)
    result = bench_head(args)
    if args.json:
        print(json.dumps(result))
        return
    r = result
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
