"""Token labeling (Jiang et al. 2021, "All Tokens Matter"): how LV-ViTs (SiT's teachers, RePaFormer's
LV-ViT rows) are trained. docs/training.md lists the readings of the official TokenLabeling code.

Label maps, in the format the TokenLabeling project publishes (its generate_label.py; NFNet-F6 maps):
one file per training image, `<label_root>/<class folder>/<image stem>.pt`, a half tensor (2, 5, h, w):
the top-5 class scores and their class indices at each of h x w positions of the whole image.

Per image (`TokenLabelTransform`, the official order): horizontal flip, RandAugment and the random
resized crop move the image and its map together (the map's geometric ops mirror the image's), and
the crop box is kept. Per batch (`TokenLabeling`): the scores are scattered into dense (C, h, w)
maps, RoIAlign-ed over the crop box to the patch grid (token targets) and to 1x1 (the class-token
target), soft-maxed over classes and smoothed; MixToken swaps a box of patch tokens with the
batch-flipped images (the model swaps their patch logits back) and mixes the class targets by area.

  L = cls_weight * CE(class logits, class target) + dense_weight * mean_j CE(patch logit j, token target j)
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from reproduce.engine import EngineError

_SPATIAL_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "TranslateX", "TranslateY")


def label_map_path(label_root, image_path) -> Path:
    """Where the TokenLabeling project keeps the map of one image: <root>/<class>/<stem>.pt."""
    image_path = Path(image_path)
    return Path(label_root) / image_path.parent.name / (image_path.name.split(".")[0] + ".pt")


# --- the label map's share of each augmentation ------------------------------------------------

def _pil_affine(name: str, args: tuple, width: int, height: int) -> tuple:
    """PIL's AFFINE data (a, b, c, d, e, f) (output pixel -> input pixel) of one of timm's geometric
    RandAugment ops with the arguments it drew, on a width x height image."""
    if name == "Rotate":  # PIL's rotate(): counter-clockwise about the centre
        angle = -math.radians(args[0])
        a, b, d, e = math.cos(angle), math.sin(angle), -math.sin(angle), math.cos(angle)
        cx, cy = width / 2.0, height / 2.0
        return a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy
    if name == "ShearX":
        return 1, args[0], 0, 0, 1, 0
    if name == "ShearY":
        return 1, 0, 0, args[0], 1, 0
    if name in ("TranslateXRel", "TranslateX"):
        return 1, 0, args[0] * width if name.endswith("Rel") else args[0], 0, 1, 0
    return 1, 0, 0, 0, 1, args[0] * height if name.endswith("Rel") else args[0]


def warp_label_map(label: torch.Tensor, affine: tuple, width: int, height: int) -> torch.Tensor:
    """Apply an image-space AFFINE map (see `_pil_affine`) to a (2, k, h, w) label map covering the
    whole width x height image, nearest neighbour; positions mapped from outside get score 0."""
    a, b, c, d, e, f = affine
    h, w = label.shape[-2:]
    sx, sy = width / w, height / h  # image pixels per map cell
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    px, py = (xs + 0.5) * sx, (ys + 0.5) * sy  # cell centres in image pixels
    qx, qy = (a * px + b * py + c) / sx, (d * px + e * py + f) / sy  # source, in map cells
    col, row = torch.floor(qx).long(), torch.floor(qy).long()
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    out = label[:, :, row.clamp(0, h - 1), col.clamp(0, w - 1)]
    out[0][:, ~inside] = 0  # scores 0: no class there (indices keep the nearest, as the official code)
    return out


class _RecordArgs:
    """Wraps one RandAugment op's function to remember the arguments it drew (picklable)."""

    def __init__(self, fn):
        self.fn, self.args = fn, None

    def __call__(self, img, *args, **kwargs):
        self.args = args
        return self.fn(img, *args, **kwargs)


class LabelRandAugment:
    """timm's RandAugment on the image, with every geometric op it applies also applied to the map."""

    def __init__(self, config: str, hparams: dict):
        from timm.data.auto_augment import rand_augment_transform

        self.augment = rand_augment_transform(config, hparams)
        for op in self.augment.ops:
            op.aug_fn = _RecordArgs(op.aug_fn)

    def __call__(self, img, label):
        ra = self.augment
        for op in np.random.choice(ra.ops, ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights):
            op.aug_fn.args = None
            width, height = img.size
            img = op(img)
            if op.aug_fn.args is not None and op.name in _SPATIAL_OPS:
                label = warp_label_map(label, _pil_affine(op.name, op.aug_fn.args, width, height), width, height)
        return img, label


class TokenLabelTransform:
    """Training transform of token labeling (the official order): flip, RandAugment (or colour
    jitter without it), random resized crop (its box kept), tensor, normalize, random erasing.
    Returns (image tensor, label map, crop box (x0, y0, x1, y1) as fractions of the image)."""

    def __init__(self, img_size: int, data_cfg: dict):
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        from timm.data.random_erasing import RandomErasing
        from timm.data.transforms import RandomResizedCropAndInterpolation
        from torchvision import transforms

        self.crop = RandomResizedCropAndInterpolation(img_size, interpolation=data_cfg.get(
            "train_interpolation", data_cfg.get("interpolation", "bicubic")))
        aa = data_cfg.get("auto_augment")
        self.rand_augment = self.jitter = None
        if aa:
            if not aa.startswith("rand"):
                raise EngineError(f"token labeling mirrors RandAugment only; data.auto_augment is {aa!r}")
            hparams = {"translate_const": int(img_size * 0.45),
                       "img_mean": tuple(min(255, round(255 * m)) for m in IMAGENET_DEFAULT_MEAN)}
            interpolation = data_cfg.get("train_interpolation", data_cfg.get("interpolation", "bicubic"))
            if interpolation != "random":
                from timm.data.transforms import str_to_pil_interp

                hparams["interpolation"] = str_to_pil_interp(interpolation)
            self.rand_augment = LabelRandAugment(aa, hparams)
        elif data_cfg.get("color_jitter", 0.4):
            self.jitter = transforms.ColorJitter(*(float(data_cfg.get("color_jitter", 0.4)),) * 3)
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN,
                                                                                         IMAGENET_DEFAULT_STD)])
        re_prob = data_cfg.get("re_prob", 0.0)
        self.erase = RandomErasing(re_prob, mode="pixel", device="cpu") if re_prob > 0 else None
        self.no_aug = data_cfg.get("no_aug", False)
        if self.no_aug:
            from timm.data.transforms import str_to_interp_mode

            self.no_aug_interpolation = str_to_interp_mode(data_cfg.get("interpolation", "bicubic"))

    def __call__(self, img, label):
        if self.no_aug:  # learn scale: the whole image, resized (timm's no_aug), and its whole map
            from torchvision.transforms import functional as TF

            img = self.to_tensor(TF.resize(img, list(self.crop.size), self.no_aug_interpolation))
            return img, label, torch.tensor([0.0, 0.0, 1.0, 1.0])
        if random.random() < 0.5:
            img, label = img.transpose(Image.FLIP_LEFT_RIGHT), label.flip(-1)
        if self.rand_augment is not None:
            img, label = self.rand_augment(img, label)
        elif self.jitter is not None:
            img = self.jitter(img)
        i, j, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        width, height = img.size
        box = torch.tensor([j / width, i / height, (j + w) / width, (i + h) / height])
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        from torchvision.transforms import functional as TF

        img = self.to_tensor(TF.resized_crop(img, i, j, h, w, list(self.crop.size), interpolation))
        if self.erase is not None:
            img = self.erase(img)
        return img, label, box


# --- the dataset ---------------------------------------------------------------------------------

def pack_target(label: torch.Tensor, box: torch.Tensor, target: int) -> torch.Tensor:
    """One tensor per image, so loaders and `.to(device)` handle it: (3, 5, h, w) = the map's scores,
    its indices, and a third slab holding the crop box (4 numbers) and the image's class."""
    extra = torch.zeros_like(label[0])
    flat = extra.view(-1)
    flat[:4], flat[4] = box, float(target)
    return torch.cat([label, extra[None]], dim=0)


class TokenLabelDataset(torch.utils.data.Dataset):
    """A timm ImageFolder dataset's images with their label maps (every map checked up front)."""

    def __init__(self, images, label_root, transform: TokenLabelTransform):
        samples = getattr(getattr(images, "reader", None), "samples", None)
        if samples is None:
            raise EngineError("token labeling reads ImageFolder data (train/<class>/<image>); "
                              f"{type(getattr(images, 'reader', images)).__name__} is not supported")
        self.samples = [(str(path), int(target)) for path, target in samples]
        self.maps = [label_map_path(label_root, path) for path, _ in self.samples]
        missing = [m for m in self.maps if not m.is_file()]
        if missing:
            raise EngineError(f"token-label maps missing for {len(missing)} of {len(self.maps)} training images "
                              f"under {label_root} (first: {missing[0]}): generate them for every image "
                              "(TokenLabeling's generate_label.py) or point token_labeling.label_root elsewhere")
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        img = Image.open(path).convert("RGB")
        label = torch.load(self.maps[index], map_location="cpu", weights_only=True).float()
        if label.ndim != 4 or label.shape[:2] != (2, 5):
            raise EngineError(f"{self.maps[index]} is not a TokenLabeling map (a (2, 5, h, w) tensor of top-5 "
                              f"scores and indices); got shape {tuple(label.shape)}")
        img, label, box = self.transform(img, label)
        return img, pack_target(label, box, target)


def generated_label_map(target: int, num_classes: int, size: int, g: torch.Generator) -> torch.Tensor:
    """One map in the published (2, 5, size, size) format: the image's class on top everywhere, four
    random others below."""
    others = torch.randperm(num_classes, generator=g)
    others = others[others != target][:4]
    scores = torch.sort(torch.rand(5, generator=g), descending=True).values * 4 + torch.tensor([6., 0, 0, 0, 0])
    if len(others) < 4:  # fewer than 5 classes: repeat the last one with its score (scatter stays exact)
        scores[1 + len(others):] = scores[len(others)]
        others = torch.cat([others, others[-1:].expand(4 - len(others))])
    classes = torch.cat([torch.tensor([target]), others]).float()
    return torch.stack([scores[:, None, None].expand(5, size, size), classes[:, None, None].expand(5, size, size)])


def make_generated_label_maps(images, label_root, num_classes: int, size: int = 4, seed: int = 0) -> Path:
    """Maps for a generated dataset (tests, smoke runs), one per image (`generated_label_map`).
    Does nothing if the folder is complete."""
    label_root = Path(label_root)
    if (label_root / ".complete").exists():
        return label_root
    g = torch.Generator().manual_seed(seed)
    for path, target in images.reader.samples:
        out = label_map_path(label_root, path)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(generated_label_map(target, num_classes, size, g).half().clone(), out)
    (label_root / ".complete").touch()
    return label_root


@torch.no_grad()
def dense_scores(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, classes, h, w): the teacher's head applied at every position of its last feature map
    instead of after the global pooling, as TokenLabeling's generate_label.py runs NFNet-F6 (its
    TokenLabelHead: the classifier as a 1x1 conv on forward_features; raw scores, whose top 5 it saves
    as half). Each position goes through `forward_head` alone, so its pooling is the identity."""
    features = teacher.forward_features(images)
    if features.ndim != 4:
        raise EngineError(f"label-map teacher {type(teacher).__name__} gives no spatial feature map "
                          f"(forward_features is {tuple(features.shape)}): use a convolutional teacher")
    B, C, h, w = features.shape
    logits = teacher.forward_head(features.permute(0, 2, 3, 1).reshape(B * h * w, C, 1, 1))
    return logits.reshape(B, h, w, -1).permute(0, 3, 1, 2)


def make_teacher_label_maps(images, label_root, teacher: nn.Module, img_size: int, source: str = "",
                            batch_size: int = 64) -> Path:
    """Maps made by a trained teacher in the published format (`label_map_path`, (2, 5, h, w) half):
    each training image whole, resized to `img_size`, through `dense_scores`; the top-5 scores and
    their classes at each position. `source` (the teacher's checkpoint) is recorded, and a folder made
    from another source is made again."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms

    label_root = Path(label_root)
    done = label_root / ".complete"
    if done.exists() and done.read_text() == source:
        return label_root
    done.unlink(missing_ok=True)
    to_input = transforms.Compose([transforms.Resize((img_size, img_size), interpolation=transforms.InterpolationMode.BICUBIC),
                                   transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    samples = images.reader.samples
    device = next(teacher.parameters()).device
    teacher.eval()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = torch.stack([to_input(Image.open(path).convert("RGB")) for path, _ in chunk]).to(device)
        top = dense_scores(teacher, batch).float().topk(5, dim=1)
        for (path, _), scores, classes in zip(chunk, top.values, top.indices):
            out = label_map_path(label_root, path)
            out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torch.stack([scores, classes.float()]).half().cpu().clone(), out)
    done.write_text(source)
    return label_root


# --- targets, MixToken and the loss ------------------------------------------------------------

def _bilinear_weights(coords: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size) weights of RoIAlign's bilinear sampling along one axis (torchvision's legacy rules:
    0 outside [-1, size], clamped at 0 and at the last pixel)."""
    valid = (coords >= -1.0) & (coords <= size)
    c = coords.clamp(min=0.0)
    low = torch.floor(c).long()
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(c), c - low.to(c.dtype))
    weights = torch.zeros(len(c), size, dtype=c.dtype, device=c.device)
    rows = torch.arange(len(c), device=c.device)
    weights.index_put_((rows, low), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights * valid[:, None]


def roi_align(maps: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """torchvision.ops.roi_align(maps, rois, output_size) (spatial scale 1, adaptive sampling,
    aligned=False), which the official code uses: the compiled op where torchvision has one, else this
    exact pure-torch equivalent (bilinear sampling is separable per axis), tested against torchvision's
    reference implementation."""
    from torchvision.extension import _has_ops

    if _has_ops():
        from torchvision.ops import roi_align as compiled

        return compiled(maps, rois, output_size)
    out_h, out_w = output_size
    _, _, H, W = maps.shape
    pooled = []
    for b, x1, y1, x2, y2 in rois.tolist():
        roi_w, roi_h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
        grid_h, grid_w = math.ceil(roi_h / out_h), math.ceil(roi_w / out_w)
        ys = y1 + (torch.arange(out_h, dtype=maps.dtype)[:, None]
                   + (torch.arange(grid_h, dtype=maps.dtype)[None] + 0.5) / grid_h) * (roi_h / out_h)
        xs = x1 + (torch.arange(out_w, dtype=maps.dtype)[:, None]
                   + (torch.arange(grid_w, dtype=maps.dtype)[None] + 0.5) / grid_w) * (roi_w / out_w)
        wy = _bilinear_weights(ys.flatten().to(maps.device), H)  # (out_h * grid_h, H)
        wx = _bilinear_weights(xs.flatten().to(maps.device), W)
        samples = torch.einsum("nh,chw,mw->cnm", wy, maps[int(b)], wx)
        pooled.append(samples.reshape(-1, out_h, grid_h, out_w, grid_w).mean(dim=(2, 4)))
    return torch.stack(pooled)


def dense_targets(packed: torch.Tensor, num_classes: int, label_size: int, smoothing: float):
    """(class target (B, C), token targets (B, S*S, C)) from packed per-image maps (`pack_target`)."""
    scores, indices, extra = packed[:, 0].float(), packed[:, 1].long(), packed[:, 2].flatten(1)
    B, _, h, w = scores.shape
    if int(indices.max()) >= num_classes:
        raise EngineError(f"a token-label map names class {int(indices.max())} but the model has {num_classes}")
    maps = torch.zeros(B, num_classes, h, w, device=packed.device).scatter_(1, indices, scores)
    box = extra[:, :4].float() * torch.tensor([w, h, w, h], device=packed.device) - 0.5
    rois = torch.cat([torch.arange(B, device=packed.device, dtype=torch.float32)[:, None], box], dim=1)
    tokens = roi_align(maps, rois, output_size=(label_size, label_size)).flatten(2)   # (B, C, S*S)
    whole = roi_align(maps, rois, output_size=(1, 1)).flatten(2)                     # (B, C, 1)
    target = F.softmax(torch.cat([whole, tokens], dim=2), dim=1)
    off = smoothing / num_classes
    target = target * (1.0 - smoothing + off) + off  # the official smoothing of token labels
    return target[:, :, 0], target[:, :, 1:].transpose(1, 2)


def mix_token_box(grid: int):
    """MixToken's box on the grid x grid token grid (CutMix's rule, lambda ~ Beta(1, 1)) and the
    share of tokens outside it."""
    lam = np.random.beta(1.0, 1.0)
    cut = int(grid * math.sqrt(1.0 - lam))
    cr, cc = np.random.randint(grid), np.random.randint(grid)
    r0, r1 = int(np.clip(cr - cut // 2, 0, grid)), int(np.clip(cr + cut // 2, 0, grid))
    c0, c1 = int(np.clip(cc - cut // 2, 0, grid)), int(np.clip(cc + cut // 2, 0, grid))
    return (r0, c0, r1, c1), 1.0 - (r1 - r0) * (c1 - c0) / (grid * grid)


def soft_cross_entropy(logits, target):
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class DenseForward(nn.Module):
    """The module DDP wraps: the model's token-labeling forward (class and patch logits)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, mix_box=None):
        return self.model.forward_dense(images, mix_box)


class TokenLabeling:
    """What `train.py` calls: one batch's token-labeling loss."""

    def __init__(self, recipe: dict, model: nn.Module):
        cfg = recipe["token_labeling"]
        name = recipe["model"]["name"]
        if getattr(model, "aux_head", None) is None or not hasattr(model, "forward_dense"):
            raise EngineError(f"{recipe['path']}: token_labeling is enabled but {name} has no token-labeling "
                              "(aux) head")
        self.label_size = cfg.get("label_size", model.grid_size[0])
        if (self.label_size, self.label_size) != tuple(model.grid_size):
            raise EngineError(f"{recipe['path']}: field `token_labeling.label_size` is {self.label_size} but {name} "
                              f"has a {model.grid_size[0]}x{model.grid_size[1]} patch grid at this image size")
        self.num_classes = recipe["model"]["num_classes"]
        self.smoothing = recipe["data"].get("label_smoothing", 0.0)
        self.cls_weight, self.dense_weight = cfg.get("cls_weight", 1.0), cfg.get("dense_weight", 1.0)
        self.mix_token = cfg.get("mix_token", True)
        self.train_module = DenseForward(model)
        self.teacher = None

    def to(self, device):
        return self

    def __call__(self, train_forward, images, packed):
        cls_target, token_target = dense_targets(packed, self.num_classes, self.label_size, self.smoothing)
        box, lam = (mix_token_box(self.label_size) if self.mix_token else (None, 1.0))
        if lam < 1.0:
            cls_target = lam * cls_target + (1.0 - lam) * cls_target.flip(0)
        cls_logits, dense_logits = train_forward(images, mix_box=box if lam < 1.0 else None)
        terms = {"cls": soft_cross_entropy(cls_logits, cls_target),
                 "dense": soft_cross_entropy(dense_logits.flatten(0, 1), token_target.flatten(0, 1))}
        loss = self.cls_weight * terms["cls"] + self.dense_weight * terms["dense"]
        return loss, {k: float(v.detach()) for k, v in terms.items()}


def _file_identity(path) -> str:
    """A teacher file as path, size and mtime: maps made from an earlier file of the same name are stale."""
    stat = Path(path).stat()
    return f"{Path(path).resolve()} {stat.st_size} {stat.st_mtime_ns}"


def build_dataset(recipe: dict, images, output: Path, ctx):
    """The training set with its label maps: the recipe's label_root; or, label_root null, maps made
    under the run folder by `token_labeling.label_teacher` (a trained model: the learning check's), or
    generated (smoke runs)."""
    from reproduce.engine import distributed
    from reproduce.engine.distill import build_teacher

    cfg = recipe["token_labeling"]
    label_root = cfg.get("label_root")
    if not label_root and (cfg.get("label_teacher") or {}).get("model"):
        teacher = build_teacher(recipe, "token_labeling.label_teacher", recipe["model"]["num_classes"],
                                "label-map teacher", random_ok=False).to(ctx.device)
        label_root = output / "teacher-labels"
        if ctx.is_main:
            make_teacher_label_maps(images, label_root, teacher, cfg.get("label_img_size", recipe["data"]["img_size"]),
                                    source=_file_identity(cfg["label_teacher"]["checkpoint"]))
        distributed.barrier(ctx)
        del teacher
    elif not label_root:
        if recipe["scale"] != "smoke":
            raise EngineError(f"{recipe['path']}: field `token_labeling.label_root` is missing: point it at the "
                              "token-label maps (the NFNet-F6 maps the TokenLabeling project publishes), or "
                              "name a trained `token_labeling.label_teacher` to make them")
        label_root = output / "generated-labels"
        if ctx.is_main:
            make_generated_label_maps(images, label_root, recipe["model"]["num_classes"],
                                      size=cfg.get("generated_size", 4), seed=recipe.get("seed", 0))
        distributed.barrier(ctx)
    transform = TokenLabelTransform(recipe["data"]["img_size"], recipe["data"])
    return TokenLabelDataset(images, label_root, transform)
