"""How large is each module-imitation term beside the distillation loss, under each reading of lambda?

RIFormer Table 10 prints "lambda x batch size" (1e-4, 1e-3, 1.0 for L'_in, L_out, L_rel); the text
allows three readings of the lambda that multiplies the batch-mean losses of Eqs. 5-8 (see
reproduce/engine/imitation.py). This script measures, on generated images, through the engine's own
build() and training_step():

  1. trains a PoolFormer-S12 teacher with cross-entropy (it serves as logit and imitation teacher);
  2. for each reading, trains RIFormer-S12 with Table 4's best recipe (label-free soft distillation
     plus module imitation of 4 blocks) and logs, at step 0 and every `--every` steps: the logit
     loss, each imitation term as computed and as weighted into the loss, and the gradient norm
     each part puts on the student's affine token mixers and on all its weights.

lambda is computed for the paper's batch (`--paper-batch`, 512: Sec. 4's roadmap) while the steps use
a CPU-sized batch: the terms are batch means, so their size does not depend on the batch.

    python scripts/imitation_scale.py --steps 300 --output results/cpu-amd-epyc-2c/imitation-scale.json
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import riformer  # noqa: F401  (registers the models before timm is used)
from reproduce.engine import distributed
from reproduce.engine import train as engine
from reproduce.engine.data import make_generated_dataset
from reproduce.engine.imitation import LAMBDA_READINGS, ModuleImitation
from reproduce.engine.recipe import load_recipe, merge

ROOT = Path(__file__).resolve().parents[1]
TEACHER_RECIPE = ROOT / "recipes/riformer/table1/pooling_ce_loss.yaml"
STUDENT_RECIPE = ROOT / "recipes/riformer/table4/feat80_rel20_layer4.yaml"


def scaled(path: Path, steps: int, img_size: int, batch: int, overrides: dict) -> dict:
    """The recipe at smoke scale, with one epoch of `steps` steps at img_size and batch."""
    recipe = load_recipe(path, scale="smoke")
    return merge(recipe, {"epochs": 1, "steps_per_epoch": steps, "batch_size": batch,
                          "optimizer": {"lr_base_size": batch}, "schedule": {"warmup_epochs": 0},
                          "data": {"img_size": img_size}, **overrides})


def gradient_norms(run, images, targets) -> dict:
    """|grad| of the logit loss and of the imitation loss, on the affine mixers and on all weights."""
    run.model.train()
    logits = run.model(images)
    with torch.no_grad():
        teacher_logits = run.teacher(images)
        run.imitation_teacher(images)
    logit_loss = run.criterion(logits, targets, teacher_logits)
    imitation_loss, _ = run.imitation.loss(run.epoch)
    weights = [p for p in run.model.parameters() if p.requires_grad]
    affine = [p for n, p in run.model.named_parameters() if ".token_mixer." in n]
    out = {}
    for name, loss in (("logit", logit_loss), ("imitation", imitation_loss)):
        grads = torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
        by_id = {id(p): g for p, g in zip(weights, grads)}
        norm = lambda ps: float(torch.sqrt(sum((by_id[id(p)] ** 2).sum() for p in ps if by_id[id(p)] is not None)))  # noqa: E731
        out[f"grad_{name}_all"], out[f"grad_{name}_affine"] = norm(weights), norm(affine)
    run.optimizer.zero_grad(set_to_none=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--paper-batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="1: the machine is shared (oversubscribed threads spin)")
    parser.add_argument("--readings", nargs="+", default=list(LAMBDA_READINGS), choices=list(LAMBDA_READINGS))
    parser.add_argument("--teacher", type=Path, default=None, help="a trained PoolFormer-S12 (skips step 1)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="imitation-scale-"))
    data = str(make_generated_dataset(work / "data", classes=4, images_per_class=64, image_size=args.img_size + 8))
    ctx = distributed.setup()

    start = time.time()
    if args.teacher:
        checkpoint, teacher = str(args.teacher), {"top1": float("nan")}
    else:
        teacher_recipe = scaled(TEACHER_RECIPE, args.teacher_steps, args.img_size, args.batch,
                                {"optimizer": {"lr_base": 2e-3, "lr_base_size": args.batch}})
        teacher = engine.train(teacher_recipe, data=data, output=work / "teacher")
        checkpoint = str(work / "teacher" / "model.pt")
        print(f"teacher PoolFormer-S12: top-1 {teacher['top1']:.1f} on the generated validation split "
              f"({time.time() - start:.0f} s)", flush=True)

    teacher_cfg = {"model": "poolformer_v1_s12", "checkpoint": checkpoint, "kwargs": {}, "constructor": None}
    report = {"device": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "steps": args.steps, "batch": args.batch,
              "img_size": args.img_size, "paper_batch": args.paper_batch, "teacher_top1": teacher["top1"],
              "student_recipe": str(STUDENT_RECIPE.relative_to(ROOT)), "readings": {}}
    for reading in args.readings:
        recipe = scaled(STUDENT_RECIPE, args.steps, args.img_size, args.batch,
                        {"distill": {"teacher": teacher_cfg}, "imitation": {"teacher": teacher_cfg,
                                                                             "lambda_reading": reading}})
        run = engine.build(recipe, data, work / reading, ctx)
        run.imitation.remove()  # lambda as at the paper's batch, not the CPU one
        run.imitation = ModuleImitation(run.model, run.imitation_teacher, recipe["imitation"], args.paper_batch)
        engine.seed_everything(0)
        log, step = [], 0
        run.model.train()
        run.train_loader.sampler.set_epoch(0)
        while step <= args.steps:
            for images, targets in run.train_loader:
                if step % args.every == 0:
                    mixed = run.mixup(images, targets) if run.mixup else (images, targets)
                    diagnostics = gradient_norms(run, *mixed)
                terms = engine.training_step(run, images, targets)
                if step % args.every == 0:
                    entry = {"step": step, **{k: terms[k] for k in sorted(terms)}, **diagnostics}
                    log.append(entry)
                    print(reading, json.dumps({k: float(f"{v:.3g}") for k, v in entry.items()}), flush=True)
                step += 1
                if step > args.steps:
                    break
        report["readings"][reading] = {"lambdas": run.imitation.lambdas, "log": log}
    report["seconds"] = round(time.time() - start)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
        print(f"-> {args.output}")


if __name__ == "__main__":
    main()
