"""PyTorch's side of `python -m pfc_jax.bench conv`: the same convolutions, the same passes.

Each distinct convolution of an iResNet (the list comes from `pfc_jax.bench.conv`, which
imports nothing heavy) in channels_last memory format, as arcface_torch trains: the
forward pass, the input gradient and the weight gradient, each timed on its own.

It is not part of the package and PyTorch is not a dependency. To reproduce the README
figures, in a separate environment with torch and numpy, from the repository root::

    python benchmarks/torch_conv.py --layers 2,2,2,2 --batch 32 [--json]
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pfc_jax.bench.conv import PASSES, iresnet_convolutions  # noqa: E402


def timed(fn, warmup, steps):
    times, cpu = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
    return times, cpu


def make_passes(x, w, g, stride, pad):
    return {
        "forward": lambda: F.conv2d(x, w, stride=stride, padding=pad),
        "input_grad": lambda: torch.nn.grad.conv2d_input(x.shape, w, g, stride=stride, padding=pad),
        "weight_grad": lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, stride=stride, padding=pad),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="2,2,2,2", help="blocks per stage: 2,2,2,2 is iResNet-18, 3,4,14,3 iResNet-50")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    layers_per_stage = tuple(int(n) for n in args.layers.split(","))
    torch.manual_seed(0)
    cl = torch.channels_last
    layers, totals, all_ms, all_cpu = [], dict.fromkeys(PASSES, 0.0), [], []
    with torch.no_grad():
        for conv in iresnet_convolutions(layers_per_stage, size=args.size):
            b, h, k, s = args.batch, conv["height"], conv["kernel"], conv["stride"]
            ho, pad = h // s, k // 2
            x = torch.randn(b, conv["cin"], h, h).to(memory_format=cl)
            w = torch.randn(conv["cout"], conv["cin"], k, k).to(memory_format=cl)
            g = torch.randn(b, conv["cout"], ho, ho).to(memory_format=cl)
            passes = make_passes(x, w, g, s, pad)
            flops = 2.0 * b * ho * ho * conv["cout"] * conv["cin"] * k * k
            row = dict(conv)
            for name, fn in passes.items():
                ms, cpu = timed(fn, args.warmup, args.steps)
                med = statistics.median(ms)
                row[name] = {"ms": med, "gflops": flops / med / 1e6}
                totals[name] += med * conv["count"]
                all_ms += ms
                all_cpu += cpu
            layers.append(row)
    result = {
        "benchmark": "torch_conv",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "layers_per_stage": layers_per_stage,
        "batch": args.batch,
        "size": args.size,
        "layers": layers,
        "total_ms": totals,
        "cores_used": sum(all_cpu) / sum(all_ms),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"convolutions  iresnet {args.layers} float32, batch {args.batch}, PyTorch {torch.__version__} channels_last "
        f"({torch.get_num_threads()} threads, {result['cores_used']:.2f} busy); "
        "ms (GFLOP/s): forward / input grad / weight grad"
    )
    for layer in layers:
        cells = " / ".join(f"{layer[p]['ms']:8.1f} ({layer[p]['gflops']:5.1f})" for p in PASSES)
        print(f"  {layer['name'] + ' ×' + str(layer['count']):<24}{cells}")
    cells = " / ".join(f"{totals[p]:8.0f}" for p in PASSES)
    print(f"  {'all, × count':<24}{cells}  = {sum(totals.values()):,.0f} ms")


if __name__ == "__main__":
    main()
