"""Training-step throughput of a RePa model beside its vanilla backbone: the training-time cost of
the BatchNorm channel-idle FFN before it is folded (docs/benchmarking.md).

One step = forward, cross-entropy, backward and a Lamb update (the RePaFormer recipe's optimizer),
in float32 at 224 px. The two models are timed in interleaved rounds; the ratio is the median of the
per-round ratios, with its range.

    python scripts/train_step_bench.py repa_deit_small deit_small_patch16_224 --batch 16 --rounds 5
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import riformer  # noqa: F401  (registers the models before timm is used)
import timm
from timm.optim import create_optimizer_v2


def steps_per_second(model, optimizer, images, targets, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs=2, help="the RePa model and its vanilla backbone")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="steps per model per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, targets = torch.randn(args.batch, 3, 224, 224), torch.randint(0, 1000, (args.batch,))
    runs = {}
    for name in args.models:
        model = timm.create_model(name, num_classes=1000).train()
        runs[name] = (model, create_optimizer_v2(model, opt="lamb", lr=1e-3, weight_decay=0.05))
        steps_per_second(*runs[name], images, targets, 1)  # warm-up
    rates = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (model, optimizer) in runs.items():
            rates[name].append(args.batch * steps_per_second(model, optimizer, images, targets, args.steps))
    repa, vanilla = args.models
    ratios = [a / b for a, b in zip(rates[repa], rates[vanilla])]
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"batch {args.batch} at 224 px, float32, Lamb, {args.rounds} interleaved rounds of {args.steps} steps")
    for name in runs:
        print(f"  {name:28s} {statistics.median(rates[name]):7.2f} img/s (range {min(rates[name]):.2f}-"
              f"{max(rates[name]):.2f})")
    print(f"  {repa} / {vanilla}: {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
