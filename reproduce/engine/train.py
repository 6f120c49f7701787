"""The training loop behind an accuracy cell: read it top to bottom.

build()  -> data, student, teachers, loss, optimizer, schedule, EMA, resume state
train()  -> for each epoch: train_one_epoch(), evaluate(), checkpoint, log line
finish() -> final model (train and deploy form) and runs/<table>/<row>/result.json
"""
from __future__ import annotations

import copy
import gc
import json
import math
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

import riformer  # noqa: F401  (registers the suite's models; must precede timm's torchvision import)
from riformer.deploy import deploy, has_deploy_form, is_deployed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from reproduce.engine import EngineError, checkpoint, distributed, frd, recipe_field, token_labeling
from reproduce.engine.data import (build_dataset, build_mixup, build_transform, eval_loader, eval_transform,
                                  make_generated_dataset, train_loader)
from reproduce.engine.digits import make_digits_dataset
from reproduce.engine.distill import (ClassificationLoss, build_teacher, create_model, init_from_teacher, load_into,
                                     load_state)
from reproduce.engine.evaluate import autocast, check_classes, evaluate
from reproduce.engine.imitation import ModuleImitation


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_data(recipe: dict, data: str | None, output: Path, ctx) -> str:
    """The data root: --data, or for smoke runs a generated ImageFolder under the output folder (the
    digits for learn runs)."""
    if data:
        return data
    if recipe["scale"] == "full":
        raise EngineError("no ImageNet data: pass --data /path/to/imagenet (with train/ and validation/ folders); "
                          "the cell stays pending until a full run writes its result")
    digits = recipe["data"].get("digits", False)
    root = output / ("digits-data" if digits else "generated-data")
    if ctx.is_main:
        if digits:
            make_digits_dataset(root, image_size=recipe["data"]["img_size"])
        else:
            make_generated_dataset(root, **recipe["data"].get("generated", {}))
    distributed.barrier(ctx)
    return str(root)


def check_token_mixer(model, expected: str | None, path: str) -> None:
    """`model.token_mixer` in a recipe is what its table prints; make sure the model has it."""
    if expected is None:
        return
    blocks = [m for m in model.modules() if hasattr(m, "norm2") and hasattr(m, "mlp")]
    mixers = {type(getattr(b, "token_mixer", torch.nn.Identity())).__name__.lower() for b in blocks}
    if expected not in {"identity" if m == "identity" else m for m in mixers}:
        raise EngineError(f"{path}: model.token_mixer is {expected!r} but {type(model).__name__}'s blocks "
                          f"mix with {sorted(mixers)}")


def build(recipe: dict, data: str | None, output: Path, ctx) -> SimpleNamespace:
    run = SimpleNamespace(recipe=recipe, ctx=ctx, output=output, epoch=0, step=0)
    run.amp = recipe.get("amp", "off") if ctx.device.type == "cuda" else "off"
    build_data(run, data)
    build_models(run)
    build_optimization(run)
    return run


def build_data(run, data: str | None) -> None:
    """Loaders: each process takes batch_size / world images per step."""
    recipe, ctx = run.recipe, run.ctx
    cfg_data, num_classes = recipe["data"], recipe["model"]["num_classes"]
    if recipe["batch_size"] % ctx.world:
        raise EngineError(f"batch_size {recipe['batch_size']} does not split over {ctx.world} processes "
                          f"({recipe['path']})")
    per_process = recipe["batch_size"] // ctx.world
    root = run.data_root = resolve_data(recipe, data, run.output, ctx)
    img_size, crop_pct = cfg_data["img_size"], cfg_data.get("crop_pct", 0.9)
    from reproduce.weights import recipe_transform

    run.eval_transform = recipe_transform(recipe["model"]["name"], cfg_data)[0]  # the one rule (reproduce.weights)
    with recipe_field(recipe, "data"):
        transforms = build_transform(cfg_data, True, img_size, crop_pct), eval_transform(run.eval_transform)
    train_set = build_dataset(cfg_data, root, cfg_data.get("train_split", "train"), True, img_size, crop_pct,
                              transforms[0])
    val_set = build_dataset(cfg_data, root, cfg_data.get("val_split", "validation"), False, img_size, crop_pct,
                            transforms[1])
    for dataset in (train_set, val_set):
        check_classes(dataset, num_classes, root, f"recipe {recipe['path']} (model.num_classes)")
    if recipe.get("token_labeling", {}).get("enabled"):  # LV-ViT teachers: the images with their label maps
        train_set = token_labeling.build_dataset(recipe, train_set, run.output, ctx)
    workers = cfg_data.get("workers", 8)
    run.train_loader = train_loader(train_set, per_process, workers, ctx.rank, ctx.world, recipe.get("seed", 0),
                                    cfg_data.get("repeated_aug", False))
    run.val_loader = eval_loader(val_set, per_process, workers, ctx.rank, ctx.world)
    if len(run.train_loader) == 0:
        raise EngineError(f"data {root} has fewer training images ({len(train_set)}) than one batch")
    run.steps_per_epoch = min(len(run.train_loader), recipe.get("steps_per_epoch") or len(run.train_loader))
    with recipe_field(recipe, "data"):
        run.mixup = build_mixup(cfg_data, num_classes)


def build_models(run, allow_random_teachers: bool = False) -> None:
    """The student, then the teachers (frozen, eval mode). The dry run allows random teachers."""
    recipe, ctx = run.recipe, run.ctx
    num_classes = recipe["model"]["num_classes"]
    seed_everything(recipe.get("seed", 0))  # the same initial weights in every process
    model = create_model(recipe, "model", recipe["model"]["name"], num_classes, recipe["model"].get("kwargs", {}))
    if recipe["model"].get("grad_checkpointing"):  # activations recomputed in backward: less memory, same grads
        with recipe_field(recipe, "model.grad_checkpointing"):
            model.set_grad_checkpointing(True)
    distill, imitate = recipe.get("distill", {}), recipe.get("imitation", {})
    random_ok = allow_random_teachers or recipe["scale"] == "smoke"  # learn runs need trained teachers
    run.teacher = None
    if distill.get("type", "none") != "none":
        run.teacher = build_teacher(recipe, "distill.teacher", num_classes, "distillation teacher", random_ok)
    run.imitation_teacher = None
    if imitate.get("enabled"):
        run.imitation_teacher = build_teacher(recipe, "imitation.teacher", num_classes, "imitation teacher", random_ok)
    run.objective = None  # SiT: FRD (students) or token labeling (LV-ViT teachers) replaces the logit loss
    if recipe.get("frd", {}).get("enabled"):
        run.objective = frd.build(recipe, model, num_classes, random_ok)  # also init_from: teacher
    elif recipe.get("token_labeling", {}).get("enabled"):
        run.objective = token_labeling.TokenLabeling(recipe, model)
    init_from = recipe["model"].get("init_from")
    with recipe_field(recipe, "model.init_from"):
        if init_from == "imitation_teacher":
            if run.imitation_teacher is None:
                raise EngineError("model.init_from is imitation_teacher but imitation is off")
            init_from_teacher(model, run.imitation_teacher)
        elif init_from and init_from != "teacher" and not (allow_random_teachers and not Path(init_from).is_file()):
            if hasattr(model, "student_only_prefixes"):  # a SiT checkpoint must hold its TSMs
                frd.check_student_checkpoint(model, load_state(init_from, "initial"), init_from)
            load_into(model, init_from, "initial", recipe["model"]["name"])
    check_token_mixer(model, recipe["model"].get("token_mixer"), recipe["path"])
    model.to(ctx.device)
    for teacher in (run.teacher, run.imitation_teacher, run.objective):
        if teacher is not None:
            teacher.to(ctx.device)
    run.model = model
    run.train_module = run.objective.train_module if run.objective is not None else model  # what DDP wraps


def peak_lrs(recipe: dict) -> tuple[float, float | None]:
    """The peak lr at the recipe's global batch (`lr_base` scaled linearly from `lr_base_size`), and
    the recalibration branch's (SiT), scaled alike, or None."""
    opt = recipe["optimizer"]
    scale = recipe["batch_size"] / opt.get("lr_base_size", recipe["batch_size"])
    recalibration = opt.get("recalibration_lr_base")
    return opt["lr_base"] * scale, (None if recalibration is None else recalibration * scale)


def build_optimization(run) -> None:
    """Optimizer (lr scaled with the global batch), per-step cosine schedule after a warmup, AMP
    scaler, EMA, the logit loss, module imitation's hooks, and the DDP wrapper."""
    recipe, ctx, model = run.recipe, run.ctx, run.model
    opt = recipe["optimizer"]
    lr, recalibration_lr = peak_lrs(recipe)
    extra = {k: (tuple(v) if k == "betas" else v) for k, v in opt.items() if k in ("eps", "betas")}
    params = model
    if recalibration_lr is not None:  # SiT Sec. 4.1: the recalibration branch's own lr
        params = frd.param_groups(run.train_module, lr, recalibration_lr, opt.get("weight_decay", 0.0))
    with recipe_field(recipe, "optimizer.name"):
        run.optimizer = create_optimizer_v2(params, opt=opt["name"], lr=lr,
                                            weight_decay=opt.get("weight_decay", 0.0), **extra)
    sched = recipe.get("schedule", {})
    with recipe_field(recipe, "schedule.name"):
        run.scheduler, run.total_epochs = create_scheduler_v2(
            run.optimizer, sched=sched.get("name", "cosine"), num_epochs=recipe["epochs"],
            warmup_epochs=sched.get("warmup_epochs", 0), warmup_lr=sched.get("warmup_lr", 1e-6),
            min_lr=sched.get("min_lr", 0.0), cooldown_epochs=sched.get("cooldown_epochs", 0),
            step_on_epochs=False, updates_per_epoch=run.steps_per_epoch)
    run.scaler = torch.amp.GradScaler(ctx.device.type, enabled=(run.amp == "fp16"))
    decay = recipe.get("ema", {}).get("decay", 0)
    run.ema = ModelEmaV3(model, decay=decay) if decay > 0 else None  # before the imitation hooks exist
    run.criterion = ClassificationLoss(recipe.get("distill", {}), recipe["data"].get("label_smoothing", 0.0))
    run.imitation = None
    if run.imitation_teacher is not None:
        run.imitation = ModuleImitation(model, run.imitation_teacher, recipe["imitation"], recipe["batch_size"],
                                        where=recipe["path"])
    run.ddp = (DistributedDataParallel(run.train_module, device_ids=[ctx.local_rank] if ctx.device.type == "cuda"
                                       else None) if ctx.distributed else run.train_module)


def save_checkpoint(run) -> None:
    """Everything --resume needs to continue bit for bit; every process's RNG state included."""
    rng = distributed.gather_objects(run.ctx, checkpoint.rng_state())
    if not run.ctx.is_main:
        return
    state = {
        "epoch": run.epoch, "step": run.step, "world": run.ctx.world, "rng": rng, "recipe": run.recipe,
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
        "ema": run.ema.state_dict() if run.ema else None,
        "objective": run.objective.state_dict() if hasattr(run.objective, "state_dict") else None,
    }
    checkpoint.save_torch(state, run.output / "checkpoint.pt")


def restore_checkpoint(run) -> None:
    state = checkpoint.load(run.output / "checkpoint.pt")
    if state["world"] != run.ctx.world:
        raise EngineError(f"{run.output}/checkpoint.pt was written by {state['world']} processes; resume with "
                          f"--nproc {state['world']} (the data order depends on it)")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    if state.get("objective"):
        run.objective.load_state_dict(state["objective"])
    run.epoch, run.step = state["epoch"], state["step"]
    checkpoint.set_rng_state(state["rng"][run.ctx.rank])


def training_step(run, images, targets) -> dict:
    """One optimizer update; returns the loss terms for the log."""
    if run.mixup is not None:
        images, targets = run.mixup(images, targets)
    with autocast(run.ctx.device, run.amp):
        if run.objective is not None:  # SiT's FRD or token labeling (engine/frd.py, engine/token_labeling.py)
            loss, terms = run.objective(run.ddp, images, targets)
        else:
            logits = run.ddp(images)
            teacher_logits = None
            if run.teacher is not None:
                with torch.no_grad():
                    teacher_logits = run.teacher(images)
            loss = run.criterion(logits, targets, teacher_logits)
            terms = {"logit_loss": loss.item()} if run.imitation is not None else {}
        if run.imitation is not None:
            with torch.no_grad():
                run.imitation_teacher(images)  # fills the teacher's hooked features
            imitation_loss, terms = run.imitation.loss(run.epoch)
            loss = loss + imitation_loss
    if not math.isfinite(loss.item()):
        raise EngineError(f"loss is {loss.item()} at epoch {run.epoch} step {run.step}: lower the lr or use bf16")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    clip = run.recipe["optimizer"].get("clip_grad")
    if clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.step += 1
    run.scheduler.step_update(run.step)
    if run.ema is not None:
        run.ema.update(run.model, step=run.step)
    return {"loss": loss.item(), **terms}


def train_one_epoch(run, progress) -> dict:
    run.model.train()
    run.train_loader.sampler.set_epoch(run.epoch)  # the order is a function of (seed, epoch)
    if run.imitation is not None and not run.imitation.active(run.epoch):
        run.imitation.remove()  # its epochs are over: stop hooking and stop running its teacher
        run.imitation = run.imitation_teacher = None
    task = progress.add_task(f"epoch {run.epoch + 1}/{run.total_epochs}", total=run.steps_per_epoch)
    sums = {}
    for i, (images, targets) in enumerate(run.train_loader):
        if i == run.steps_per_epoch:
            break
        images, targets = images.to(run.ctx.device, non_blocking=True), targets.to(run.ctx.device, non_blocking=True)
        terms = training_step(run, images, targets)
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + value
        progress.update(task, advance=1, description=f"epoch {run.epoch + 1}/{run.total_epochs} "
                                                     f"loss {terms['loss']:.4f}")
    progress.remove_task(task)  # one bar, the running epoch's; finished epochs are their printed lines
    run.scheduler.step(run.epoch + 1)
    keys = sorted(sums)
    totals = distributed.sum_across(run.ctx, *[sums[k] for k in keys], run.steps_per_epoch)
    return {k: v / totals[-1] for k, v in zip(keys, totals[:-1])}


def append_log(run, line: dict) -> None:
    if run.ctx.is_main:
        with open(run.output / "log.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def trim_log(run) -> None:
    """On resume, drop log lines of epochs the checkpoint does not contain (they will rerun)."""
    path = run.output / "log.jsonl"
    if run.ctx.is_main and path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] < run.epoch]
        path.write_text("".join(line + "\n" for line in keep))


FOLD_TOLERANCE = 1e-3       # max |logit difference| / max |logit|, float32: a fold is exact or it is wrong
TOP1_TOLERANCE = 0.1        # points: bf16 evaluation may flip the odd image whose top-2 logits tie


@torch.no_grad()
def fold_error(model, folded, images) -> float:
    """max |logit difference| / max |logit| of the trained and folded forms, in float32, eval mode."""
    trained, deployed = model.eval()(images).float(), folded.eval()(images).float()
    return ((trained - deployed).abs().max() / trained.abs().max().clamp_min(1e-12)).item()


def deploy_form(run, metrics: dict):
    """The final model folded (riformer.deploy) and evaluated: (folded model or None, the two top-1s).

    A fold that changes the function beyond float noise fails the run: the logits of both forms on
    one validation batch in float32, and the two top-1s over the whole split, must agree."""
    if not has_deploy_form(run.model):
        return None, {"top1_train": metrics["top1"], "top1_deploy": metrics["top1"], "deploy_form": False}, \
            metrics.get("predictions")
    if all(is_deployed(m) for m in run.model.modules() if callable(getattr(m, "switch_to_deploy", None))):
        return run.model, {"top1_train": metrics["top1"], "top1_deploy": metrics["top1"], "deploy_form": True,
                           "fold_error": 0.0}, metrics.get("predictions")  # trained deployed (Table 1's identity rows)
    folded = deploy(copy.deepcopy(run.model).eval())
    error = fold_error(run.model, folded, next(iter(run.val_loader))[0][:8].to(run.ctx.device))
    deployed = evaluate(folded, run.val_loader, run.ctx, run.amp, predictions=True)
    top1 = deployed["top1"]
    failed = distributed.sum_across(run.ctx, float(error > FOLD_TOLERANCE))[0]
    if failed or abs(top1 - metrics["top1"]) > TOP1_TOLERANCE:
        raise EngineError(f"the folded model does not compute what the trained one does (relative logit error "
                          f"{error:.2e}, top-1 {metrics['top1']:.2f} trained vs {top1:.2f} folded): the fold of "
                          f"{type(run.model).__name__} is not exact; {run.output / 'model.pt'} is kept")
    return folded, {"top1_train": metrics["top1"], "top1_deploy": top1, "deploy_form": True,
                    "fold_error": error}, deployed["predictions"]


def finish(run, metrics: dict, info: dict) -> dict:
    """Save the final model in its train and deploy forms, then the cell's result.json (with provenance)."""
    from reproduce import provenance

    data, extra = run.recipe["data"], {k: info[k] for k in ("teacher_top1",) if k in info}
    result = {"top1": metrics["top1"], "top5": metrics["top5"]}
    if run.ctx.is_main:
        checkpoint.save_torch(run.model.state_dict(), run.output / "model.pt")
    folded, forms, deploy_predictions = deploy_form(run, metrics)  # both forms evaluated; an inexact fold fails
    result.update(forms)
    if run.ctx.is_main:
        if folded is not None:
            checkpoint.save_torch(folded.state_dict(), run.output / "model_deploy.pt")
        if run.ema is not None:
            checkpoint.save_torch(run.ema.module.state_dict(), run.output / "model_ema.pt")
        result = provenance.write_result(
            run.output / "result.json", cell=info, metrics=metrics, model=run.recipe["model"]["name"], form="train",
            img_size=data["img_size"], recipe={"path": info.get("recipe", run.recipe["path"])},
            weights={"path": str((run.output / "model.pt").resolve()), "layout": "ours"},
            data={"root": run.data_root, "split": data.get("val_split", "validation"), "images": metrics.get("images"),
                  "classes": run.recipe["model"]["num_classes"]},
            transform=run.eval_transform,
            scale=run.recipe["scale"], device=str(run.ctx.device), command=info.get("command") or None,
            deploy_predictions=deploy_predictions, epochs=run.total_epochs, **extra, **forms)
    return result


def train(recipe: dict, *, data: str | None, output, resume: bool = False, info: dict | None = None) -> dict:
    """Train one recipe to the end (or from its last checkpoint) and evaluate it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    ctx = distributed.setup()
    output, info = Path(output), info or {}
    output.mkdir(parents=True, exist_ok=True)
    run = None
    try:
        run = build(recipe, data, output, ctx)
        teacher = run.teacher if run.teacher is not None else getattr(run.objective, "teacher", None)
        if teacher is not None:  # Table 5 prints the teacher's own accuracy beside the student's
            # before the RNG is set: a loader's iterator draws from it, which would shift a resumed run
            info["teacher_top1"] = evaluate(teacher, run.val_loader, ctx, run.amp)["top1"]
        if resume:
            restore_checkpoint(run)
            trim_log(run)
        else:
            seed_everything(recipe.get("seed", 0) + ctx.rank)  # augmentations differ across processes
        metrics = {"top1": float("nan"), "top5": float("nan")}
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        from rich.console import Console

        # the bar only on a terminal (piped, a log gets the per-epoch lines alone, no blank line at the end)
        with Progress(*columns, disable=not ctx.is_main or not Console().is_terminal, transient=True) as progress:
            while run.epoch < run.total_epochs:
                start = time.time()
                losses = train_one_epoch(run, progress)
                # the last epoch's per-image predictions are the evidence its result.json is derived from
                metrics = evaluate(run.model, run.val_loader, ctx, run.amp, predictions=run.epoch + 1 == run.total_epochs)
                line = {"epoch": run.epoch, "lr": run.optimizer.param_groups[0]["lr"], **losses,
                        **{k: v for k, v in metrics.items() if k not in ("predictions", "class_names")}}
                if run.ema is not None:
                    line.update({f"ema_{k}": v for k, v in evaluate(run.ema.module, run.val_loader, ctx, run.amp).items()})
                run.epoch += 1
                save_checkpoint(run)
                append_log(run, {**line, "seconds": round(time.time() - start, 3)})
                if ctx.is_main:
                    progress.console.print(f"epoch {run.epoch}/{run.total_epochs}  loss {losses['loss']:.4f}  "
                                           f"top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}")
        if math.isnan(metrics["top1"]):  # resumed after the last epoch: evaluate what the checkpoint holds
            metrics = evaluate(run.model, run.val_loader, ctx, run.amp, predictions=True)
        return finish(run, metrics, info)
    finally:
        # DDP's reducer must be gone before its process group: freed after destroy_process_group
        # (when train() returns), a gloo worker can hang at exit.
        del run
        gc.collect()
        distributed.teardown(ctx)
