"""Dense-gradient PyTorch head step: the baseline that `pfc_jax.bench head` is compared with.

This is the straightforward way to write a Partial FC head in PyTorch, and what
insightface's arcface_torch (PartialFC_V2) does on each process: the class centers are
one dense ``nn.Parameter`` of shape [C, D]; each step draws every positive plus random
negatives (``rand`` + ``topk``), indexes those rows, computes the ArcFace margin softmax,
back-propagates into a *dense* C x D gradient and steps SGD with momentum and weight
decay over *all* rows.

It is not part of the package and PyTorch is not a dependency. To reproduce the README
figures, in a separate environment::

    pip install torch numpy
    python benchmarks/torch_dense_head.py --classes 1000000 --batch 256 --dim 512 \
        --rate 0.1 --steps 5 --json
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F


def make_step(weight, optimizer, scale, margin, num_sample):
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    # Beyond theta + m > pi the margin is replaced by a monotone linear penalty.
    threshold = math.cos(math.pi - margin)

    def step(embeddings, labels):
        num_classes = weight.shape[0]
        with torch.no_grad():
            scores = torch.rand(num_classes)
            scores[torch.unique(labels)] = 2.0
            index = torch.topk(scores, k=num_sample).indices.sort().values
            target = torch.searchsorted(index, labels)
        rows = weight[index]  # backward writes a dense [C, D] gradient
        cos = F.linear(F.normalize(embeddings), F.normalize(rows)).clamp(-1.0, 1.0)
        target_cos = cos.gather(1, target[:, None])
        sin = torch.sqrt((1.0 - target_cos * target_cos).clamp_min(0.0))
        with_margin = torch.where(
            target_cos > threshold,
            target_cos * cos_m - sin * sin_m,
            target_cos - 1.0 - threshold,
        )
        logits = cos.scatter(1, target[:, None], with_margin) * scale
        loss = F.cross_entropy(logits, target)
        loss.backward()
        optimizer.step()  # dense momentum + weight decay over all C rows
        optimizer.zero_grad(set_to_none=False)
        embeddings.grad = None
        return loss.detach()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.normal(0.0, 0.01, (args.classes, args.dim)))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    num_sample = min(args.classes, max(math.ceil(args.rate * args.classes), args.batch))
    step = make_step(weight, optimizer, scale=64.0, margin=0.5, num_sample=num_sample)
    embeddings = torch.randn(args.batch, args.dim, requires_grad=True)
    labels = torch.randint(0, args.classes, (args.batch,))

    for _ in range(args.warmup):
        step(embeddings, labels)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step(embeddings, labels)
        times.append((time.perf_counter() - start) * 1e3)
    result = {
        "impl": "torch-dense",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "classes": args.classes,
        "batch": args.batch,
        "dim": args.dim,
        "rate": args.rate,
        "num_sample": num_sample,
        "ms_per_step": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "loss": float(loss),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"torch dense head  C={args.classes} B={args.batch} D={args.dim} "
            f"rate={args.rate} sampled={num_sample}: median {result['ms_per_step']:.1f} ms "
            f"(min {result['ms_min']:.1f}, max {result['ms_max']:.1f}) over {args.steps} steps"
        )


if __name__ == "__main__":
    main()
