"""PyTorch's side of `python -m pfc_jax.bench train --backbone iresnetN`: one training step.

An iResNet written the way insightface's arcface_torch defines it (stem conv3x3-BN-PReLU,
IBasicBlock = BN, conv3x3, BN, PReLU, conv3x3(stride), BN, plus a 1x1 shortcut where the
shape changes; BN, flatten, FC, BN1d), channels_last, fp32, trained as arcface_torch
trains: SGD momentum 0.9, weight decay 5e-4, the backbone's gradient clipped to norm 5,
and an ArcFace margin softmax over the sampled class centers (``--classes x --rate``
rows) with the centers in the same optimizer. ``--backbone-only`` drops the head (a sum
of squares of the embedding stands in for the loss), as ``bench train``'s "backbone
alone" does.

It is not part of the package and PyTorch is not a dependency. To reproduce the README
figures, in a separate environment with torch::

    python benchmarks/torch_iresnet_step.py --layers 2,2,2,2 --batch 32 --classes 100000 --rate 0.1
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.shortcut is None else self.shortcut(x))


class IResNet(nn.Module):
    def __init__(self, layers, widths=(64, 128, 256, 512), dim=512, size=112):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.prelu = nn.PReLU(widths[0])
        blocks, cin = [], widths[0]
        for n, c in zip(layers, widths):
            blocks += [Block(cin, c, 2)] + [Block(c, c, 1) for _ in range(n - 1)]
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.bn2 = nn.BatchNorm2d(cin)
        side = size // 16
        self.fc = nn.Linear(cin * side * side, dim)
        self.features = nn.BatchNorm1d(dim)

    def forward(self, x):
        x = self.bn2(self.blocks(self.prelu(self.bn1(self.conv1(x)))))
        return self.features(self.fc(torch.flatten(x, 1)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="2,2,2,2", help="blocks per stage: 2,2,2,2 is iResNet-18, 3,4,14,3 iResNet-50")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--backbone-only", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    model = IResNet(tuple(int(n) for n in args.layers.split(","))).to(memory_format=torch.channels_last)
    sampled = max(1, int(args.classes * args.rate))
    centers = nn.Parameter(torch.randn(sampled, 512) * 0.01)
    params = list(model.parameters()) + ([] if args.backbone_only else [centers])
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(args.batch, 3, 112, 112).to(memory_format=torch.channels_last)
    labels = torch.randint(0, sampled, (args.batch,))
    scale, margin = 64.0, 0.5
    times, cpu = [], []
    for i in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        embeddings = model(images)
        if args.backbone_only:
            loss = embeddings.square().mean()
        else:
            cos = F.normalize(embeddings) @ F.normalize(centers).t()
            theta = torch.acos(cos.gather(1, labels[:, None]).clamp(-1 + 1e-7, 1 - 1e-7))
            target = torch.where(theta + margin < math.pi, torch.cos(theta + margin), cos.gather(1, labels[:, None]))
            loss = F.cross_entropy(cos.scatter(1, labels[:, None], target) * scale, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
    med = statistics.median(times)
    result = {
        "benchmark": "torch_iresnet_step",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "layers": args.layers,
        "batch": args.batch,
        "classes": args.classes,
        "rate": args.rate,
        "backbone_only": args.backbone_only,
        "ms_per_step": med,
        "ms_min": min(times),
        "ms_max": max(times),
        "samples_per_sec": args.batch / med * 1e3,
        "cores_used": sum(cpu) / sum(times),
    }
    if args.json:
        print(json.dumps(result))
    else:
        what = "backbone alone" if args.backbone_only else f"full step, {sampled:,} sampled centers"
        print(
            f"PyTorch {torch.__version__} iResNet {args.layers}, batch {args.batch}, {what}: {med:,.0f} ms/step "
            f"({result['samples_per_sec']:.2f} samples/s, {min(times):,.0f}-{max(times):,.0f}), "
            f"cores busy {result['cores_used']:.2f} of {torch.get_num_threads()}"
        )


if __name__ == "__main__":
    main()
