"""Top-1 / top-5 with the papers' eval transform (resize by crop ratio, centre crop)."""
from __future__ import annotations

import contextlib

import riformer  # noqa: F401  (before timm: installs the torchvision shim)
import timm
import torch

from reproduce.engine import EngineError, distributed
from reproduce.engine.data import build_dataset, eval_loader, num_classes_of


def autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model, loader, ctx, amp: str = "off") -> dict:
    """Top-1/top-5 in % over the whole split, summed across processes."""
    model.eval()
    correct1 = correct5 = seen = 0
    for images, targets in loader:
        images, targets = images.to(ctx.device), targets.to(ctx.device)
        with autocast(ctx.device, amp):
            logits = model(images)
        top5 = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top5 == targets[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=-1).sum().item()
        seen += targets.numel()
    correct1, correct5, seen = distributed.sum_across(ctx, correct1, correct5, seen)
    return {"top1": 100.0 * correct1 / max(seen, 1), "top5": 100.0 * correct5 / max(seen, 1), "images": int(seen)}


def check_classes(dataset, num_classes: int, root: str, where: str) -> None:
    found = num_classes_of(dataset)
    if found is not None and found != num_classes:
        raise EngineError(f"data {root} has {found} classes but {where} has {num_classes}: "
                          "point --data at the right dataset or fix num_classes")


def evaluate_checkpoint(model_name: str, checkpoint: str, data: str, *, img_size=224, crop_pct=0.9,
                        num_classes=1000, split="validation", batch_size=64, workers=4, deploy=False,
                        dataset="", interpolation="bicubic", model_kwargs=None) -> dict:
    """`reproduce eval`: build the model, load the checkpoint (deploy form if asked), evaluate."""
    from riformer.deploy import deploy as fold
    from reproduce.engine.distill import load_into

    ctx = distributed.setup()
    if model_name not in timm.list_models(model_name):
        raise EngineError(f"unknown model {model_name!r} (see `timm.list_models()` after `import riformer`)")
    model = timm.create_model(model_name, num_classes=num_classes, **(model_kwargs or {}))
    if deploy:
        fold(model.eval())
    load_into(model, checkpoint, "model")
    data_cfg = {"dataset": dataset, "interpolation": interpolation}
    val = build_dataset(data_cfg, data, split, is_training=False, img_size=img_size, crop_pct=crop_pct)
    check_classes(val, num_classes, data, f"model {model_name}")
    loader = eval_loader(val, batch_size, workers, ctx.rank, ctx.world)
    result = evaluate(model.to(ctx.device), loader, ctx, amp="bf16")
    distributed.teardown(ctx)
    return result
