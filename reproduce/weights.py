"""The weights manifest (recipes/weights.yaml): which released file fills which table row.

    release_of(table, row[, column])   the Release that fills the row's (or that column's) accuracy, or None
    why_none(table, row[, column])     why nothing released fills it (with its source), or None
    release_for_cell(spec, row, column)   the Release whose evaluation fills that cell, or None
    cells_of(release)           [(table, row), ...] that one release fills
    unlisted(spec)              the rows with accuracy cells that the manifest does not mention
    find(release, weights_dir)  its file in DIR (checksum verified where published), or None
    transform_of(release)       the authors' eval transform {resize, crop, interpolation, mean, std, crop_mode}
    resolve_transform(model, img_size[, checkpoint], **overrides)   the one eval-transform rule
    (evaluating every row whose file is in DIR, `reproduce table --weights`: engine/cells.evaluate_table)

Errors are `WeightsError` (one line).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from reproduce.registry import ROOT

MANIFEST = ROOT / "recipes" / "weights.yaml"  # not registry.RECIPES, which tests point at scratch specs
EVAL_WORKERS = 4  # data-loader workers of `reproduce table --weights`


class WeightsError(ValueError):
    """A weights file that is missing, corrupt or not the published one; the message is one line."""


@dataclass(frozen=True)
class Release:
    name: str
    project: str
    model: str
    file: str = ""
    url: str = ""
    sha256: str = ""
    sha256_prefix: str = ""
    layout: str = ""
    form: str = "train"
    img_size: int = 224
    transform: dict = field(default_factory=dict, compare=False)
    transform_source: str = ""
    timm_tag: str = ""
    top1: float | None = None  # published ImageNet-1k top-1 of this file (top1_source: where)
    top1_source: str = ""
    port_of: str = ""  # the row's model this file's `model` has the very tensors of (e.g. tf_efficientnet_b1:
    #                    TF padding), filling that row's accuracy with its own model (a column entry)

    @property
    def local_name(self) -> str:
        return self.file or f"{self.timm_tag}.safetensors"


@lru_cache(maxsize=None)
def _manifest() -> dict:
    data = yaml.safe_load(MANIFEST.read_text())
    releases = {name: Release(name=name, **entry) for name, entry in data["releases"].items()}
    for table, rows in data["tables"].items():
        for row, entry in rows.items():
            named = [entry] if isinstance(entry, str) else [v for k, v in entry.items() if k != "none"]
            for name in named:
                if name not in releases:
                    raise WeightsError(f"{MANIFEST.name}: {table}/{row} names unknown release {name!r}")
    return {"releases": releases, "tables": data["tables"], "top1_tolerance": float(data["top1_tolerance"])}


def top1_tolerance() -> float:
    """How far (points) a release's published top-1 may be from a reference cell it fills."""
    return _manifest()["top1_tolerance"]


def releases() -> dict[str, Release]:
    return _manifest()["releases"]


def _entry(table: str, row: str):
    """A row's manifest entry: a release name (all its accuracy cells), or a mapping of column ids to
    release names (a column that is its own run, e.g. one teacher's top-1) with `none:` for the rest."""
    return _manifest()["tables"].get(table, {}).get(row)


def release_of(table: str, row: str, column: str | None = None) -> Release | None:
    entry = _entry(table, row)
    if isinstance(entry, str):
        return releases()[entry]
    if isinstance(entry, dict) and column in entry and column != "none":
        return releases()[entry[column]]
    return None


def why_none(table: str, row: str, column: str | None = None) -> str | None:
    entry = _entry(table, row)
    if not isinstance(entry, dict) or (column is not None and column in entry and column != "none"):
        return None
    return entry.get("none")


def column_releases(table: str, row: str) -> dict[str, Release]:
    """The columns of a row that a release fills on its own ({} for a whole-row entry or none)."""
    entry = _entry(table, row)
    return {c: releases()[n] for c, n in entry.items() if c != "none"} if isinstance(entry, dict) else {}


def column_model(table: str, row: str, column: str) -> str | None:
    """The model a column's own release is evaluated as (a teacher, or a port such as tf_efficientnet_b1
    filling efficientnet_b1's top-1), or None: the cell's model is then the row's."""
    release = column_releases(table, row).get(column)
    return release.model if release else None


def release_for_cell(spec, row: str, column: str) -> Release | None:
    """The release whose evaluation fills this accuracy cell: a row's release fills the row's own
    model's cells, not another model's (a `model_from` column such as the teacher's top-1), unless the
    manifest names a release for that very column."""
    if column in column_releases(spec.id, row):
        return release_of(spec.id, row, column)
    return None if spec.columns[column].model_from else release_of(spec.id, row, column)


def accuracy_rows(spec) -> list[str]:
    """The rows of a table with accuracy cells the paper prints for a model of the suite (not cited)."""
    columns = {c.id for c in spec.columns.values() if c.kind == "accuracy"}
    printed = {r for r, c in zip(spec.reference["row"], spec.reference["column"]) if c in columns}
    return [r.id for r in spec.rows.values() if r.id in printed and not r.cited]


def unlisted(spec) -> list[str]:
    """Accuracy rows the manifest does not mention: neither a release nor why there is none."""
    return [r for r in accuracy_rows(spec) if _entry(spec.id, r) is None]


def tables() -> list[str]:
    return list(_manifest()["tables"])


def cells_of(release: str) -> list[tuple[str, str]]:
    return [(t, r) for t, rows in _manifest()["tables"].items() for r, e in rows.items()
            if e == release or (isinstance(e, dict) and release in e.values())]


def transform_from_cfg(cfg, img_size: int | None = None) -> dict:
    """timm's eval transform of a pretrained cfg at `img_size` (its input size if None; its test size
    and test crop_pct when asked for that size): resize = floor(size / crop_pct), crop_mode included
    ('squash' resizes both edges, e.g. NFNet)."""
    size = img_size or cfg.input_size[-1]
    crop_pct = cfg.crop_pct
    if cfg.test_input_size and size == cfg.test_input_size[-1] and size != cfg.input_size[-1]:
        crop_pct = cfg.test_crop_pct or cfg.crop_pct
    return {"resize": math.floor(size / crop_pct + 1e-6), "crop": size, "interpolation": cfg.interpolation,
            "mean": list(cfg.mean), "std": list(cfg.std), "crop_mode": cfg.crop_mode or "center"}


def _timm_cfg(name: str):
    import riformer  # noqa: F401  (torchvision shim before timm)
    import timm

    try:
        return timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        return None


def transform_of(release: Release) -> dict:
    """The release's eval transform: the manifest's (its authors' code), else timm's cfg of its tag."""
    if release.transform:
        return {"crop_mode": "center", **release.transform}
    cfg = _timm_cfg(release.timm_tag)
    if cfg is None:
        raise WeightsError(f"timm has no pretrained cfg {release.timm_tag!r}")
    return transform_from_cfg(cfg, release.img_size)


def transform_source(release: Release) -> str:
    return release.transform_source or f"timm's pretrained cfg of {release.timm_tag}"


def release_of_model(model: str, img_size: int, checkpoint: str | None = None) -> Release | None:
    """The release a checkpoint of `model` at `img_size` is: the one whose file name it has, else the
    model's only release at that size (None when there is none, or several with different transforms)."""
    named = [r for r in releases().values() if checkpoint and Path(checkpoint).name == r.local_name]
    if named:
        return named[0]
    found = [r for r in releases().values() if r.model == model and r.img_size == img_size]
    return found[0] if found and all(transform_of(r) == transform_of(found[0]) for r in found) else None


TRANSFORM_KEYS = ("resize", "crop", "interpolation", "mean", "std", "crop_mode")


def resolve_transform(model: str, img_size: int, checkpoint: str | None = None, **overrides) -> tuple[dict, str]:
    """The one eval transform rule (reproduce eval, reproduce table --weights, a training run's own
    evaluation): the manifest's release of this file/model, else timm's pretrained cfg of the model,
    else crop 0.9 bicubic ImageNet mean/std; then `overrides` (resize, crop_pct, interpolation, mean,
    std, crop_mode; None = keep). Returns (transform, where it came from)."""
    release = release_of_model(model, img_size, checkpoint)
    cfg = None if release else _timm_cfg(model)
    if release is not None:
        transform, source = transform_of(release), f"release {release.name}: {transform_source(release)}"
    elif cfg is not None:
        transform, source = transform_from_cfg(cfg, img_size), f"timm's pretrained cfg of {model}"
    else:
        transform = {"resize": math.floor(img_size / 0.9 + 1e-6), "crop": img_size, "interpolation": "bicubic",
                     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_mode": "center"}
        source = "default (crop 0.9, bicubic, ImageNet mean/std)"
    given = {k: v for k, v in overrides.items() if v is not None}
    if "crop_pct" in given:
        given["resize"] = given.get("resize") or math.floor(img_size / given.pop("crop_pct") + 1e-6)
    if given:
        transform = {**transform, **{k: list(v) if k in ("mean", "std") else v for k, v in given.items()}}
        source += f"; overridden: {', '.join(sorted(given))}"
    return transform, source


def recipe_transform(model: str, data_cfg: dict) -> tuple[dict, str]:
    """A training run's own evaluation: the transform of the model's release at this size (the authors'
    eval, which the cell's reference number was measured with: e.g. mmpretrain's 236 for RIFormer-M36,
    426/404 at 384), else the recipe's crop_pct / interpolation / eval_mean / eval_std over timm's cfg of
    the model."""
    img_size = data_cfg["img_size"]
    release = release_of_model(model, img_size)
    if release is not None:
        return transform_of(release), f"release {release.name}: {transform_source(release)}"
    return resolve_transform(model, img_size, crop_pct=data_cfg.get("crop_pct"),
                             interpolation=data_cfg.get("interpolation"), mean=data_cfg.get("eval_mean"),
                             std=data_cfg.get("eval_std"))


def same_transform(a: dict | None, b: dict | None) -> bool:
    """Whether two recorded transforms are the same (crop_mode 'center' when not recorded)."""
    def norm(t):
        t = {"crop_mode": "center", **(t or {})}
        return tuple(tuple(round(float(x), 4) for x in t.get(k) or ()) if k in ("mean", "std") else t.get(k)
                     for k in TRANSFORM_KEYS)
    return norm(a) == norm(b)


def describe_transform(t: dict) -> str:
    if not all(k in t for k in ("resize", "crop", "interpolation", "mean")):
        return f"an incomplete transform {t}"
    mean = "0.5" if list(t["mean"]) == [0.5, 0.5, 0.5] else "ImageNet" if [round(x, 3) for x in t["mean"]] == \
        [0.485, 0.456, 0.406] else ",".join(map(str, t["mean"]))
    mode = " squash" if t.get("crop_mode") == "squash" else ""
    return f"resize {t['resize']}{mode} / crop {t['crop']} / {t['interpolation']} / mean-std {mean}"


def find(release: Release, weights_dir) -> Path | None:
    """The release's file in `weights_dir` (None if absent), its checksum checked where published."""
    from riformer.checkpoints import sha256 as file_sha256

    path = Path(weights_dir) / release.local_name
    if not path.is_file():
        return None
    if release.sha256 or release.sha256_prefix:
        digest = file_sha256(path)
        published = release.sha256 or release.sha256_prefix
        if not digest.startswith(published):
            raise WeightsError(f"{path}: sha256 {digest[:12]}… is not the published {published} of {release.name} "
                               f"({release.url}); download it again")
    return path


BROWSER_ONLY = ("drive.google.com",)  # share pages, not files: a plain GET returns HTML


def needs_browser(release: Release) -> bool:
    return any(host in release.url for host in BROWSER_ONLY)


def where_from(release: Release) -> str:
    return release.url or f"https://huggingface.co/timm/{release.timm_tag}"


@lru_cache(maxsize=None)
def tensor_elements(model: str, img_size: int = 224) -> int:
    """The elements of `model`'s state dict (parameters and buffers), built on the meta device."""
    import riformer  # noqa: F401  (torchvision shim before timm)
    import timm
    import torch

    with torch.device("meta"):
        try:  # a model whose tensors depend on the image size (position embeddings, RandFormer) takes it
            built = timm.create_model(model, img_size=img_size) if img_size != 224 else timm.create_model(model)
        except TypeError:
            built = timm.create_model(model)
    return sum(v.numel() for v in built.state_dict().values())


def size_estimate(release: Release) -> str:
    """No source publishes every file's size, so none is written in the manifest: this is computed, and
    says so (float32 weights alone; a training checkpoint with optimizer state or EMA is larger)."""
    try:
        elements = tensor_elements(release.model, release.img_size)
    except Exception as err:  # noqa: BLE001  a model that does not build names why, on the line
        return f"unknown ({release.model} does not build: {str(err).splitlines()[0][:60]})"
    return f"about {elements * 4 / 1e6:,.0f} MB (estimated: {elements / 1e6:.2f} M float32 elements x 4 bytes)"


def release_details(release: Release) -> list[tuple[str, str]]:
    """Where to get it, its size, published top-1 and eval transform: enough for a manual download."""
    top1 = f"{release.top1:g} ({release.top1_source})" if release.top1 is not None else "not recorded"
    try:
        transform = f"{describe_transform(transform_of(release))} ({transform_source(release)})"
    except WeightsError as err:
        transform = str(err)
    details = [("url", where_from(release) + ("  (a share page: open it in a browser)" if needs_browser(release)
                                              else "")),
               ("size", size_estimate(release)), ("top-1", top1), ("transform", transform)]
    if release.port_of:
        details.append(("model", f"{release.model}: the tensors of the row's {release.port_of}, with its own "
                                 f"layers (evaluated as {release.model})"))
    return details


def wrap(text: str, indent: str, width: int = 80) -> list[str]:
    """Lines of at most `width` columns; a word longer than that (a URL) and a `command` in backticks stay
    whole, so each can be copied from one line."""
    import re
    import textwrap

    kept = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\xa0"), text)  # textwrap splits on ASCII space only
    lines = textwrap.wrap(kept, width=width, initial_indent=indent, subsequent_indent=indent + "    ",
                          break_long_words=False, break_on_hyphens=False)
    return [line.replace("\xa0", " ") for line in lines] or [indent]


def release_block(head: str, release: Release, state: str, get: str | None = None, indent: str = "  ") -> list[str]:
    """A file's lines in `reproduce weights`: `head: state`, then how to get it and its details, one each."""
    lines = wrap(f"{head}: {state}", indent)
    for name, value in ([("get", get)] if get else []) + release_details(release):
        lines += wrap(f"{name}: {value}", indent + "    ")
    return lines


@lru_cache(maxsize=None)
def _unresolved_host(host: str) -> str | None:
    import socket

    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        return f"{host} cannot be reached ({getattr(err, 'strerror', None) or err})"
    return None


def _unresolved(url: str) -> str | None:
    """Why the URL's host cannot be resolved (no network), or None; asked once per host."""
    import os
    from urllib.parse import urlparse

    if "huggingface.co" in url:
        url = os.environ.get("HF_ENDPOINT", url)
    return _unresolved_host(urlparse(url).hostname or url)


def download(release: Release, weights_dir) -> Path:
    """Fetch the release into `weights_dir` (needs a network), written atomically and checked
    against its published checksum; one-line WeightsError otherwise."""
    import shutil

    from reproduce import files

    target = Path(weights_dir) / release.local_name
    elsewhere = f"download it elsewhere and put it in {weights_dir} as {release.local_name}"
    if needs_browser(release):
        raise WeightsError(f"{release.name}: {release.url} is a share page, not a file: open it in a browser (or "
                           f"use gdown) and save the file in {weights_dir} as {release.local_name}")
    where = f"{release.url or 'hf-hub timm/' + release.timm_tag}"
    unreachable = _unresolved(where_from(release))
    if unreachable:  # offline: one line now, not a client's retries and back-off per file
        raise WeightsError(f"cannot download {release.name} ({where}): {unreachable}; {elsewhere}")
    try:
        if release.timm_tag:
            import logging

            from huggingface_hub import hf_hub_download

            hub_log = logging.getLogger("huggingface_hub")
            level = hub_log.level
            hub_log.setLevel(logging.ERROR)  # its retry warnings would bury the one line
            try:
                cached = hf_hub_download(f"timm/{release.timm_tag}", "model.safetensors")
            finally:
                hub_log.setLevel(level)
            with open(cached, "rb") as source:
                files.atomic_write(target, lambda f: shutil.copyfileobj(source, f))
        else:
            import urllib.request

            with urllib.request.urlopen(release.url, timeout=60) as response:  # noqa: S310  (published https)
                files.atomic_write(target, lambda f: shutil.copyfileobj(response, f))
    except Exception as err:  # noqa: BLE001  any network failure is the same one line
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsError(f"cannot download {release.name} ({where}): {reason[:120]}; {elsewhere}") from None
    with open(target, "rb") as written:
        page = written.read(512).lstrip()[:1] == b"<"  # an HTML page (a login or confirmation page)
    if page:
        target.unlink()
        raise WeightsError(f"{release.name}: {release.url} returned a web page, not the file; {elsewhere}")
    try:
        find(release, weights_dir)
    except WeightsError:
        target.unlink()
        raise
    return target
