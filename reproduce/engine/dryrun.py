"""Dry run: a recipe proven at its real configuration, without data or trained weights.

`dry_run(recipe)` builds what `reproduce train` would build at full scale: the full-size student,
every teacher (random weights unless the recipe's checkpoint file is there, then it is loaded and
so checked), the transforms, Mixup, optimizer, schedule and loss with module imitation's hooks,
and runs one optimizer step at the real image size on a tiny batch of synthetic images put
through the recipe's own train transform. Then it folds the student (riformer.deploy) and checks
that both forms compute the same logits. A recipe that would crash an 8-GPU job after its data
loaded fails here in seconds, with one line naming the recipe file and the field.

Outcomes are cached on disk (`.cache/dryrun/`), keyed by the resolved recipe, the code that builds
and trains models, and the state of the checkpoint files it names, so `reproduce list` can ask
`cached_outcome(recipe)` for free. `reproduce dry-run --all` (CI: `make dry-run`) runs every recipe.
"""
from __future__ import annotations

import copy
import functools
import gc
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from reproduce import files
from reproduce.engine import EngineError, _show, distributed, recipe_field

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
CACHE_DIR = Path(os.environ.get("REPRODUCE_DRYRUN_CACHE", ROOT / ".cache" / "dryrun"))
NOT_RECIPES = ("tables", "protocols", "figures")  # folders of recipes/ that hold other data
IGNORED_FIELDS = ("description", "path", "scale")  # do not change what a dry run builds
BATCH = 2                                       # even (Mixup pairs images), > 1 (BatchNorm statistics)
LABEL_MAP = 14                                  # side of the generated token-label maps


@dataclass
class DryRun:
    recipe: str                      # as the user would type it (relative to the repository)
    ok: bool
    error: str = ""                  # one line naming the recipe file and the field
    seconds: float = 0.0
    student: str = ""
    params_m: float = 0.0
    teachers: list = field(default_factory=list)   # "distill gfnet_h_b (random)", ...
    notes: list = field(default_factory=list)
    img_size: int = 0
    loss: float | None = None
    fold_error: float | None = None  # None: nothing to fold
    cached: bool = False

    def lines(self) -> list[str]:
        """What the terminal shows: the verdict and the recipe, then what was built (80 columns)."""
        if not self.ok:
            return [f"FAIL {self.error}"]
        took = "cached" if self.cached else f"{self.seconds:.1f} s"
        fold = "nothing to fold" if self.fold_error is None else f"fold exact ({self.fold_error:.0e})"
        return [f"ok   {self.recipe} ({took})",
                f"     {' · '.join([f'{self.student} {self.params_m:.1f}M', *self.teachers])}",
                f"     1 step at {self.img_size} px, batch {BATCH}: loss {self.loss:.3f}; {fold}",
                *(f"     note: {note}" for note in self.notes)]


def recipe_files() -> list[Path]:
    """Every training recipe of the suite: the YAML files of recipes/<paper>/**."""
    folders = [p for p in sorted(RECIPES.iterdir()) if p.is_dir() and p.name not in NOT_RECIPES]
    return [path for folder in folders for path in sorted(folder.rglob("*.yaml"))]


def configuration(recipe: dict) -> str:
    """What a dry run builds, coarsely: the student, the image size, every teacher the recipe uses and
    the losses in use. Recipes that differ only in hyper-parameters (lr, epochs, λ values, an idle
    ratio or other model kwargs) have the same configuration."""
    from reproduce.engine.recipe import get

    distill = get(recipe, "distill.type", "none")
    imitation, frd = bool(get(recipe, "imitation.enabled")), bool(get(recipe, "frd.enabled"))
    return json.dumps([get(recipe, "model.name"), get(recipe, "data.img_size"), distill,
                       get(recipe, "distill.teacher.model") if distill != "none" else None,
                       imitation, get(recipe, "imitation.teacher.model") if imitation else None,
                       frd, get(recipe, "frd.teacher.model") if frd else None,
                       get(recipe, "frd.cnn_teacher.model") if frd else None,
                       bool(get(recipe, "token_labeling.enabled")), get(recipe, "model.init_from") is not None],
                      default=str)


def distinct(paths) -> list[Path]:
    """The first recipe of each distinct configuration (CI's `make dry-run`); a recipe that does not
    load is kept, so that its error shows."""
    from reproduce.engine.recipe import load_recipe

    seen, out = set(), []
    for path in paths:
        try:
            key = configuration(load_recipe(path))
        except EngineError:
            key = str(path)
        if key not in seen:
            seen.add(key)
            out.append(path)
    return out


@lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """Hash of the code that builds and trains models, and the library versions it runs on."""
    import timm

    digest = hashlib.sha1(f"torch {torch.__version__} timm {timm.__version__}".encode())
    for path in sorted((ROOT / "riformer").glob("*.py")) + sorted((ROOT / "reproduce" / "engine").glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _checkpoints(recipe: dict) -> list[str]:
    from reproduce.engine.recipe import get

    teachers = ("distill.teacher", "imitation.teacher", "frd.teacher", "frd.cnn_teacher", "model.init_teacher")
    paths = [get(recipe, f"{w}.checkpoint") for w in teachers]
    init = get(recipe, "model.init_from")
    return [p for p in paths + [init if init not in ("imitation_teacher", "teacher") else None] if p]


def needed_files(recipe: dict) -> list[tuple[str, str]]:
    """(recipe field, path) of every file a real run of `recipe` loads, under the conditions that
    train.build_models and frd.build load them: each teacher in use, the initial weights."""
    from reproduce.engine.recipe import get

    fields = ["distill.teacher"] if get(recipe, "distill.type", "none") != "none" else []
    fields += ["imitation.teacher"] if get(recipe, "imitation.enabled") else []
    if get(recipe, "frd.enabled"):
        fields += ["frd.teacher"] + (["frd.cnn_teacher"] if get(recipe, "frd.lambda_hard", 0.0) else [])
        fields += ["model.init_teacher"] if get(recipe, "model.init_from") == "teacher" else []
    if get(recipe, "token_labeling.enabled") and not get(recipe, "token_labeling.label_root"):
        fields += ["token_labeling.label_teacher"] if get(recipe, "token_labeling.label_teacher.model") else []
    found = [(f"{f}.checkpoint", get(recipe, f"{f}.checkpoint")) for f in fields]
    init = get(recipe, "model.init_from")
    found += [("model.init_from", init)] if init not in (None, "imitation_teacher", "teacher") else []
    return [(where, str(path)) for where, path in found if path]


def how_to_get(path: str, table: str | None = None) -> str:
    """Where a checkpoint file comes from: the weights manifest's release of that file name (fetched by
    `reproduce weights` of `table`, or of a table whose recipes load it; a share page needs a browser),
    or the recipe that trains it (a run folder runs/<table>/<row>[--<column>]/model.pt)."""
    from reproduce import weights

    try:
        named = [r for r in weights.releases().values() if r.local_name == Path(path).name]
    except (weights.WeightsError, OSError, ValueError):
        named = []
    for release in named:
        if weights.needs_browser(release):
            return f"a share page ({release.project}): open {release.url} in a browser and save the file as {path}"
        table = table or _table_loading(path) or next((t for t, _ in weights.cells_of(release.name)), None)
        if table:
            return f"`reproduce weights {table} --download` (saves it as {path})"
        return f"{release.project}'s release ({weights.where_from(release)}), saved as {path}"
    trains = _training_command(path)
    if trains:
        return f"the recipe that trains it: `{trains}`"
    return "not in recipes/weights.yaml: train or fetch it and put it there"


def _table_loading(path: str) -> str | None:
    """The first table (registry order) one of whose recipes loads `path`."""
    return _first_table_loading().get(path)


@functools.lru_cache(maxsize=1)
def _first_table_loading() -> dict[str, str]:
    from reproduce.engine.recipe import load_recipe
    from reproduce.registry import RECIPES, load_table, table_ids

    first: dict[str, str] = {}
    for table in table_ids():
        spec = load_table(table)
        recipes = {r for row in spec.rows.values() for r in [row.recipe, *row.recipes.values()] if r}
        for recipe in sorted(r for r in recipes if (RECIPES / r).is_file()):
            for _, loaded in needed_files(load_recipe(RECIPES / recipe)):
                first.setdefault(loaded, table)
    return first


def _training_command(path: str) -> str | None:
    """`reproduce train TABLE ROW [--column C] ...` whose run writes `path` (runs/<table>/<run>/model.pt)."""
    from reproduce.registry import RegistryError, load_table

    parts = Path(path).parts
    if len(parts) != 4 or parts[0] != "runs" or parts[3] != "model.pt":
        return None
    try:
        spec = load_table(parts[1])
    except RegistryError:
        return None
    row, _, column = parts[2].partition("--")
    if row not in spec.rows or (column and column not in spec.rows[row].recipes):
        return None
    option = f" --column {column}" if column else ""
    return f"reproduce train {spec.id} {row}{option} --data /path/to/imagenet"


def missing_files(recipe: dict, data: str | None = None, need_data: bool = False, table: str | None = None) -> list[str]:
    """One phrase per file or folder a real run of `recipe` needs that is not there, with how to get it."""
    from reproduce.engine.data import _check_folder

    missing = [f"{path} ({where}; {how_to_get(path, table)})" for where, path in needed_files(recipe)
               if not Path(path).is_file()]
    if data is None and need_data:
        missing.append("ImageNet-1k (pass --data /path/to/imagenet with train/ and validation/ folders)")
    elif data is not None:
        for split in (recipe["data"].get("train_split", "train"), recipe["data"].get("val_split", "validation")):
            try:
                _check_folder(data, split)
            except EngineError as err:
                missing.append(str(err))
                break
    return missing


def cache_key(recipe: dict) -> str:
    """The resolved recipe (minus its description and path), the code, and the checkpoint files."""
    config = {k: v for k, v in recipe.items() if k not in IGNORED_FIELDS}
    state = {p: (Path(p).stat().st_size, Path(p).stat().st_mtime_ns) if Path(p).is_file() else None
             for p in _checkpoints(recipe)}
    text = json.dumps([config, state, code_fingerprint(), BATCH], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def _cache_path(key: str) -> Path:
    return CACHE_DIR / f"{key}.json"


def cached_outcome(path) -> DryRun | None:
    """The stored outcome of this recipe's dry run at the current code, or None (never ran, or the
    recipe, the code or a checkpoint file changed since). A recipe that does not load fails."""
    from reproduce.engine.recipe import load_recipe

    try:
        recipe = load_recipe(path)
    except EngineError as err:
        return DryRun(recipe=_show(path), ok=False, error=str(err))
    stored = _cache_path(cache_key(recipe))
    if not stored.exists():
        return None
    try:
        data = json.loads(stored.read_text())
    except (ValueError, OSError):
        return None
    return DryRun(**{**data, "recipe": _show(path), "cached": True})


def _synthetic_batch(recipe: dict, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BATCH noise images of 256 x 320 pixels through the recipe's train transform, random labels;
    with token labeling, generated label maps through its joint transform, packed as the loader packs
    them (engine/token_labeling.py)."""
    from PIL import Image

    from reproduce.engine import token_labeling
    from reproduce.engine.data import build_transform

    cfg = recipe["data"]
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)) for _ in range(BATCH)]
    labels = torch.arange(BATCH) % num_classes
    with recipe_field(recipe, "data"):
        train = build_transform(cfg, True, cfg["img_size"], cfg.get("crop_pct", 0.9))
        build_transform(cfg, False, cfg["img_size"], cfg.get("crop_pct", 0.9))
        if not recipe.get("token_labeling", {}).get("enabled"):
            return torch.stack([train(img) for img in noise]), labels
    with recipe_field(recipe, "token_labeling"):
        joint = token_labeling.TokenLabelTransform(cfg["img_size"], cfg)
        g = torch.Generator().manual_seed(0)
        packed = []
        for img, label in zip(noise, labels.tolist()):
            tensor, label_map, box = joint(img, token_labeling.generated_label_map(label, num_classes, LABEL_MAP, g))
            packed.append((tensor, token_labeling.pack_target(label_map, box, label)))
    return torch.stack([t for t, _ in packed]), torch.stack([p for _, p in packed])


def _teacher_note(recipe: dict, where: str, what: str) -> str:
    from reproduce.engine.recipe import get

    checkpoint = get(recipe, f"{where}.checkpoint")
    state = "loaded" if checkpoint and Path(checkpoint).is_file() else "random"
    return f"{what} {get(recipe, f'{where}.model')} ({state})"


def _run(recipe: dict) -> DryRun:
    from riformer.deploy import deploy, has_deploy_form

    from reproduce.engine import train as engine
    from reproduce.engine.data import build_mixup

    ctx = distributed.setup()
    run = SimpleNamespace(recipe=recipe, ctx=ctx, output=None, epoch=0, step=0, amp="off", steps_per_epoch=1,
                          data_root=None)
    num_classes = recipe["model"]["num_classes"]
    images, targets = _synthetic_batch(recipe, num_classes)
    with recipe_field(recipe, "data"):
        run.mixup = build_mixup(recipe["data"], num_classes)
    engine.build_models(run, allow_random_teachers=True)
    engine.build_optimization(run)
    outcome = DryRun(recipe=_show(recipe["path"]), ok=True, student=recipe["model"]["name"],
                     params_m=sum(p.numel() for p in run.model.parameters()) / 1e6, img_size=images.shape[-1])
    if run.teacher is not None:
        with recipe_field(recipe, "distill.teacher"), torch.no_grad():
            run.teacher(images)  # the teacher sees the student's images: a size it cannot take fails here
        outcome.teachers.append(_teacher_note(recipe, "distill.teacher", "distill"))
    if run.imitation_teacher is not None:
        outcome.teachers.append(_teacher_note(recipe, "imitation.teacher", "imitation"))
    init = recipe["model"].get("init_from")
    if recipe.get("frd", {}).get("enabled"):
        outcome.teachers.append(_teacher_note(recipe, "frd.teacher", "FRD"))
    if init and init not in ("imitation_teacher", "teacher") and not Path(init).is_file():
        outcome.notes.append(f"model.init_from {init} not found: random initial weights")
    missing = missing_files(recipe)
    if missing:
        outcome.notes.append(f"random weights stood in; a real run needs {'; '.join(missing)}")
    run.model.train()
    with recipe_field(recipe, "model"):
        terms = engine.training_step(run, images.to(ctx.device), targets.to(ctx.device))
    outcome.loss = terms["loss"]
    if run.imitation is not None:
        run.imitation.remove()
    del run.optimizer, run.scheduler, run.ema, run.teacher, run.imitation_teacher, run.imitation
    gc.collect()
    if has_deploy_form(run.model):
        with recipe_field(recipe, "model.name"):
            folded = deploy(copy.deepcopy(run.model).eval())
            outcome.fold_error = engine.fold_error(run.model, folded, images[:BATCH].to(ctx.device))
        if not outcome.fold_error <= engine.FOLD_TOLERANCE:
            raise EngineError(f"{_show(recipe['path'])}: field `model.name`: the deploy form of {recipe['model']['name']} "
                              f"does not compute what the trained form does (relative logit error "
                              f"{outcome.fold_error:.2e})")
    return outcome


def dry_run(path, *, use_cache: bool = True) -> DryRun:
    """Prove the recipe at `path` at its real configuration (see the module docstring).

    Never raises for a problem of the recipe: the outcome says ok or gives the one-line error.
    A successful or recipe-caused outcome is cached; running out of memory or a crash of the suite
    itself is not (one line, and the other recipes still run)."""
    from reproduce.engine.recipe import load_recipe

    start = time.time()
    try:
        recipe = load_recipe(path)
    except EngineError as err:
        return DryRun(recipe=_show(path), ok=False, error=str(err))
    key = cache_key(recipe)
    if use_cache:
        cached = cached_outcome(path)
        if cached is not None:
            return cached
    torch.manual_seed(0)
    try:
        outcome = _run(recipe)
    except EngineError as err:
        outcome = DryRun(recipe=_show(path), ok=False, error=str(err))
    except (MemoryError, torch.OutOfMemoryError) as err:
        return DryRun(recipe=_show(path), ok=False, error=f"{_show(path)}: out of memory ({err})",
                      seconds=time.time() - start)
    except Exception as err:  # noqa: BLE001  a crash of the suite, not a recipe error: one line, not cached
        import traceback

        frame = traceback.extract_tb(err.__traceback__)[-1]
        return DryRun(recipe=_show(path), ok=False, seconds=time.time() - start,
                      error=f"{_show(path)}: the suite crashed ({type(err).__name__}: {str(err).splitlines()[0][:120]} "
                            f"at {Path(frame.filename).name}:{frame.lineno}); please report it")
    finally:
        gc.collect()
    outcome.seconds = round(time.time() - start, 2)
    if outcome.loss is not None and not math.isfinite(outcome.loss):
        outcome.ok, outcome.error = False, f"{_show(path)}: loss is {outcome.loss} after one step"
    files.atomic_write_text(_cache_path(key), json.dumps({k: v for k, v in asdict(outcome).items()
                                                          if k not in ("recipe", "cached")}))
    return outcome
