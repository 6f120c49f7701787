"""Top-1 / top-5 with the papers' eval transform (resize by crop ratio, centre crop)."""
from __future__ import annotations

import contextlib

import riformer  # noqa: F401  (before timm: installs the torchvision shim)
import torch

from reproduce.engine import EngineError, distributed
from reproduce.engine.data import build_dataset, eval_loader, num_classes_of  # noqa: F401


def autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model, loader, ctx, amp: str = "off", predictions: bool = False) -> dict:
    """Top-1/top-5 in % over the whole split, summed across processes. With `predictions`, also
    the per-image evidence (reproduce/evidence.py) on every process: "predictions" [(image id,
    target, top-5), ...] of the whole split and "class_names" (the reader's, in index order)."""
    model.eval()
    correct1 = correct5 = seen = 0
    dataset, indices = _images_of(loader)
    mine = []
    for images, targets in loader:
        images, targets = images.to(ctx.device), targets.to(ctx.device)
        with autocast(ctx.device, amp):
            logits = model(images)
        top5 = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top5 == targets[:, None]
        if predictions:
            for k, (target, best) in enumerate(zip(targets.tolist(), top5.tolist())):
                mine.append((image_id(dataset, indices[seen + k]), target, best))
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=-1).sum().item()
        seen += targets.numel()
    correct1, correct5, seen = distributed.sum_across(ctx, correct1, correct5, seen)
    result = {"top1": 100.0 * correct1 / max(seen, 1), "top5": 100.0 * correct5 / max(seen, 1), "images": int(seen)}
    if predictions:
        result["predictions"] = [p for shard in distributed.gather_objects(ctx, mine) for p in shard]
        result["class_names"] = class_names(dataset)
    return result


def _images_of(loader):
    """(the dataset, the index of each image the loader yields, in order): eval_loader's shard."""
    from torch.utils.data import Subset

    dataset, indices = loader.dataset, None
    while isinstance(dataset, Subset):  # a sample of the split (reproduce verify --data), sharded
        indices = [dataset.indices[i] for i in indices] if indices is not None else list(dataset.indices)
        dataset = dataset.dataset
    return dataset, range(len(dataset)) if indices is None else indices


def image_id(dataset, index: int) -> str:
    """An image's path relative to the split folder as the ImageFolder reader lists it (else '#index')."""
    try:
        return str(dataset.filename(index)).replace("\\", "/")
    except (AttributeError, TypeError, NotImplementedError):
        return f"#{index}"


def class_names(dataset) -> list[str] | None:
    class_to_idx = getattr(getattr(dataset, "reader", None), "class_to_idx", None)
    return sorted(class_to_idx, key=class_to_idx.get) if class_to_idx else None


def check_classes(dataset, num_classes: int, root: str, where: str) -> None:
    found = num_classes_of(dataset)
    if found is not None and found != num_classes:
        raise EngineError(f"data {root} has {found} classes but {where} has {num_classes}: "
                          "point --data at the right dataset or fix num_classes")


def default_transform(img_size: int, crop_pct: float = 0.9, interpolation: str = "bicubic", mean=None, std=None) -> dict:
    """The papers' default eval transform: resize the short side to img_size / crop_pct, centre crop."""
    import math

    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {"resize": math.floor(img_size / crop_pct + 1e-6), "crop": img_size, "interpolation": interpolation,
            "mean": list(mean or IMAGENET_DEFAULT_MEAN), "std": list(std or IMAGENET_DEFAULT_STD)}


def evaluate_checkpoint(model_name: str, checkpoint: str, data: str, *, transform: dict, img_size=224,
                        num_classes=1000, split="validation", batch_size=64, workers=4, form="train",
                        dataset="", model_kwargs=None, only=None) -> dict:
    """`reproduce eval`: build the model, load the checkpoint through the one loader (a train-form
    file is folded for form='deploy'), evaluate with `transform`. Metrics, the per-image
    predictions, plus what was loaded. `only`: image ids to evaluate instead of the whole split."""
    from riformer.checkpoints import CheckpointError, load_model

    val = build_dataset({"dataset": dataset}, data, split, is_training=False, img_size=img_size, crop_pct=1.0,
                        transform=transform)
    found = num_classes_of(val)
    if found is not None and found > num_classes:  # fewer is fine: the result records the count
        raise EngineError(f"data {data} has {found} classes but model {model_name} has {num_classes}: "
                          "point --data at the right dataset or pass --num-classes")
    try:
        model = load_model(model_name, checkpoint, form=form, num_classes=num_classes, **(model_kwargs or {}))
    except CheckpointError as err:
        raise EngineError(str(err)) from None
    ctx = distributed.setup()
    split_ids = [image_id(val, i) for i in range(len(val))]
    subset = val
    if only is not None:
        from torch.utils.data import Subset

        wanted = set(only)
        subset = Subset(val, [i for i, name in enumerate(split_ids) if name in wanted])
    loader = eval_loader(subset, batch_size, workers, ctx.rank, ctx.world)
    result = evaluate(model.to(ctx.device), loader, ctx, amp="bf16", predictions=True)
    distributed.teardown(ctx)
    report = model.checkpoint_report
    return {**result, "classes": num_classes_of(val), "layout": report.layout, "form": report.form,
            "device": str(ctx.device), "split_images": split_ids}
