"""Data: timm datasets and transforms with the papers' augmentation, DDP-aware loaders, and a
generated ImageFolder dataset (real JPEG files) for tests and smoke runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from reproduce.engine import EngineError


def make_generated_dataset(root, classes=4, images_per_class=8, image_size=40, seed=0) -> Path:
    """Write `root/{train,validation}/class_<k>/<i>.jpg`: noisy images whose colour and stripe
    orientation depend on the class, so that a tiny model can learn them in a few steps.
    Does nothing if the folder is already complete."""
    from PIL import Image

    root = Path(root)
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:image_size, 0:image_size]
    for split, count in (("train", images_per_class), ("validation", max(2, images_per_class // 2))):
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([(k * 97) % 256, (k * 57 + 80) % 256, (k * 151 + 30) % 256], dtype=np.float32)
            stripes = np.sin((xx if k % 2 else yy) * (0.3 + 0.15 * k))[..., None] * 60
            for i in range(count):
                pixels = colour + stripes + rng.normal(0, 25, (image_size, image_size, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    done.touch()
    return root


def _check_folder(root: str, split: str) -> None:
    """timm silently falls back to `root` itself when a split folder is missing; we refuse."""
    path = Path(root)
    if not path.exists():
        raise EngineError(f"data path {path} does not exist (pass --data /path/to/imagenet)")
    if path.is_dir() and not any((path / s).exists() for s in _split_names(split)):
        raise EngineError(f"data path {path} has no `{split}` folder (expected {path}/{split}/<class>/<image>)")


def _split_names(split):
    from timm.data.dataset_factory import _EVAL_SYNONYM, _TRAIN_SYNONYM

    for synonyms in (_TRAIN_SYNONYM, _EVAL_SYNONYM):
        if split in synonyms:
            return (split, *synonyms)
    return (split,)


def _posterize_keeping_zero_bits():
    """Pillow >= 13 refuses posterize(img, 0), which timm's RandAugment asks for at magnitude 10
    (`inc1`); older Pillow returned a black image. Restore that result so training does not crash."""
    from PIL import Image
    from timm.data import auto_augment

    original = auto_augment.posterize
    if getattr(original, "keeps_zero_bits", False):
        return

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return original(img, bits_to_keep, **kwargs)

    posterize.keeps_zero_bits = True
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is original:
            auto_augment.NAME_TO_OP[name] = posterize


def build_transform(data_cfg: dict, is_training: bool, img_size: int, crop_pct: float):
    """The papers' train transform (RandAugment, random erasing, ...), or their eval transform:
    resize to img_size / crop_pct, centre crop img_size."""
    from timm.data import create_transform

    if is_training:
        _posterize_keeping_zero_bits()
        return create_transform(
            img_size, is_training=True, no_aug=data_cfg.get("no_aug", False), auto_augment=data_cfg.get("auto_augment"),
            color_jitter=data_cfg.get("color_jitter", 0.4), re_prob=data_cfg.get("re_prob", 0.0),
            re_mode=data_cfg.get("re_mode", "pixel"),
            interpolation=data_cfg.get("train_interpolation", data_cfg.get("interpolation", "bicubic")))
    return create_transform(img_size, is_training=False, crop_pct=crop_pct,
                            interpolation=data_cfg.get("interpolation", "bicubic"))


def eval_transform(transform: dict):
    """An authors' eval transform, exactly: resize the short side (crop_mode 'squash': both edges) to
    `resize` px, centre-crop `crop`,
    normalise with `mean`/`std` (the weights manifest records these per release)."""
    from timm.data import str_to_interp_mode
    from torchvision import transforms

    size = int(transform["resize"])
    squash = transform.get("crop_mode", "center") == "squash"  # timm's 'squash': both edges to `resize`
    return transforms.Compose([
        transforms.Resize((size, size) if squash else size,
                          interpolation=str_to_interp_mode(transform.get("interpolation", "bicubic"))),
        transforms.CenterCrop(int(transform["crop"])), transforms.ToTensor(),
        transforms.Normalize(tuple(transform["mean"]), tuple(transform["std"]))])


def build_dataset(data_cfg: dict, root: str, split: str, is_training: bool, img_size: int, crop_pct: float,
                  transform=None):
    """A timm dataset with the training augmentation, the papers' eval transform (resize by crop
    ratio, centre crop), a transform of the caller's, or an authors' eval transform given as a dict
    (the weights manifest's, see `eval_transform`)."""
    from timm.data import create_dataset

    if not data_cfg.get("dataset"):
        _check_folder(root, split)
    dataset = create_dataset(data_cfg.get("dataset", ""), root=root, split=split, is_training=is_training)
    if isinstance(transform, dict):
        transform = eval_transform(transform)
    dataset.transform = transform or build_transform(data_cfg, is_training, img_size, crop_pct)
    return dataset


def num_classes_of(dataset) -> int | None:
    reader = getattr(dataset, "reader", None)
    class_to_idx = getattr(reader, "class_to_idx", None)
    return len(class_to_idx) if class_to_idx else None


def train_loader(dataset, batch_size_per_process: int, workers: int, rank: int, world: int, seed: int,
                 repeated_aug: bool = False):
    """Shuffled per epoch by (seed, epoch) alone, so the order survives a resume; call
    `loader.sampler.set_epoch(epoch)` before each epoch."""
    if repeated_aug:  # timm's RepeatAugSampler (DeiT); off in the RIFormer recipes (Table 10)
        from timm.data.distributed_sampler import RepeatAugSampler

        sampler = RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
    return DataLoader(dataset, batch_size=batch_size_per_process, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=False)


def eval_loader(dataset, batch_size_per_process: int, workers: int, rank: int, world: int):
    """Every process takes every world-th image, without the padding DistributedSampler adds, so
    that the summed counts are exact."""
    shard = Subset(dataset, list(range(rank, len(dataset), world)))
    return DataLoader(shard, batch_size=batch_size_per_process, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available())


def build_mixup(data_cfg: dict, num_classes: int):
    """timm's Mixup/CutMix with label smoothing; None when the recipe turns both off."""
    from timm.data import Mixup

    mixup, cutmix = data_cfg.get("mixup", 0.0), data_cfg.get("cutmix", 0.0)
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, switch_prob=data_cfg.get("mixup_switch_prob", 0.5),
                 label_smoothing=data_cfg.get("label_smoothing", 0.0), num_classes=num_classes)
