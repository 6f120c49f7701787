"""Benchmark (not a test): images/s of one SiT-Ti training step with FRD (student forward_train, LV-ViT-Ti
teacher, L_cls + L_token + L_logits, RTSM at its lr) beside a plain cross-entropy step of the same model.
Full size (224, batch 8 per step here), random weights, CPU, median of timed steps after a warm-up.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_frd.py [--threads 1] [--steps 5] [--batch 8]
"""
import argparse
import statistics
import time

import torch

import riformer  # noqa: F401
import timm
from reproduce.engine import frd
from reproduce.engine.distill import ClassificationLoss


def time_steps(step, steps):
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 3, 224, 224), torch.randint(0, 1000, (args.batch,))

    plain = timm.create_model("sit_ti", recalibration=False).train()
    ce = ClassificationLoss({"type": "none"}, 0.1)
    opt_plain = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-4)

    def ce_step():
        loss = ce(plain(x), y)
        opt_plain.zero_grad()
        loss.backward()
        opt_plain.step()

    student, teacher = timm.create_model("sit_ti").train(), timm.create_model("lvvit_ti").eval().requires_grad_(False)
    wrap = frd.FRDStudent(student, list(range(len(student.blocks))), torch.nn.ModuleList())
    loss_fn = frd.FRDLoss({"lambda_token": 2.0, "lambda_logits": 2.0}, 0.1, frd.block_pairs(14, 14, "same"))
    opt = torch.optim.AdamW(frd.param_groups(wrap, 1e-4, 5e-4, 0.05))

    def frd_step():
        out = wrap(x)
        t_logits, t_tokens = frd.teacher_outputs(teacher, x, student.grid_size, True)
        loss, _ = loss_fn.compute(out, y, t_logits, t_tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for name, step in (("cross-entropy", ce_step), ("FRD", frd_step)):
        median, low, high = time_steps(step, args.steps)
        print(f"{name:14s} {args.batch / median:6.2f} img/s  (step {median:.2f} s, range {low:.2f}-{high:.2f} s, "
              f"batch {args.batch}, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
