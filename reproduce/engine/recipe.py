"""Training recipes: YAML data with `base:` inheritance and a `smoke:` section for tiny runs.

A recipe names a base recipe (`base: ../base.yaml`, relative to the recipe's own folder) whose
keys it overrides, merged recursively. A model's `kwargs` belong to that model: a section that
names another model (`model.name`, a teacher's `model`) starts from its own kwargs, not the base's.
`load_recipe(path, scale="smoke")` also merges the recipe's `smoke:` section on top: the only
place where a smoke run differs from a full one, except two rules that keep a smoke run the row's
own: the imitation epochs scale with the epochs (so Table 4's rows stay distinct), and logit
teachers are built at the reduced shape `recipes/smoke_teachers.yaml` gives their family.
`scale="learn"` (the learning check, docs/training.md) merges `smoke:` and then `learn:`: the row's
own code at a tiny width, long enough to learn the handwritten digits (engine/digits.py).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml

from reproduce.engine import EngineError


class RecipeError(EngineError):
    pass


# Every field a recipe may set, with its type(s); a nested dict is a section. `None` in a tuple
# means the field may be null.
_NUM = (int, float)
_TEACHER = {"model": (str, type(None)), "checkpoint": (str, type(None)), "kwargs": dict,
            "constructor": (str, type(None))}  # a model class built with kwargs (smoke_teachers.yaml)
SCHEMA = {
    "description": str,
    "learn_threshold": _NUM,                # learn scale: the val top-1 (%) the learning check requires
    "seed": int,
    "epochs": int,
    "steps_per_epoch": (int, type(None)),   # cut epochs short (smoke runs); null = the whole loader
    "batch_size": int,                      # global: summed over all processes
    "amp": str,                             # bf16 | fp16 | off (always off on CPU)
    "model": {
        "name": str,
        "num_classes": int,
        "token_mixer": str,                 # pooling | identity | affine | ...: checked against the model
        "kwargs": dict,
        "init_from": (str, type(None)),     # null | imitation_teacher | teacher (SiT) | a checkpoint path
        "init_teacher": _TEACHER,
        "grad_checkpointing": bool,         # timm's set_grad_checkpointing(): per-block recompute (SiT-L: with_cp)           # SiT: the LV-ViT init_from: teacher copies, if not frd.teacher
    },
    "data": {
        "dataset": str,                     # timm dataset name; "" = ImageFolder / tar layout
        "train_split": str,
        "val_split": str,
        "img_size": int,
        "crop_pct": _NUM,
        "interpolation": str,
        "eval_mean": list,                  # the evaluation's normalisation, where the authors' eval differs from
        "eval_std": list,                   # their training's (RePaViT: 0.5 for MlpMixer, weights.recipe_transform)
        "train_interpolation": str,         # default: interpolation (token labeling: random)
        "auto_augment": (str, type(None)),
        "color_jitter": _NUM,
        "re_prob": _NUM,
        "re_mode": str,                     # random erasing fill: pixel (DeiT's and timm train.py's) | const
        "mixup": _NUM,
        "cutmix": _NUM,
        "mixup_switch_prob": _NUM,
        "label_smoothing": _NUM,
        "repeated_aug": bool,
        "no_aug": bool,                     # deterministic train transform (equivalence tests)
        "workers": int,
        "generated": {"classes": int, "images_per_class": int, "image_size": int},
        "digits": bool,                     # learn scale: sklearn's digits as an ImageFolder (engine/digits.py)
    },
    "optimizer": {
        "name": str,                        # adamw | lamb | any timm optimizer
        "lr_base": _NUM,                    # peak lr at lr_base_size; scaled linearly with batch_size
        "lr_base_size": int,
        "weight_decay": _NUM,
        "eps": _NUM,
        "betas": list,
        "clip_grad": (_NUM, type(None)),
        "recalibration_lr_base": (_NUM, type(None)),  # SiT: lr of the recalibration branch (RTSM), scaled like lr_base
    },
    "schedule": {
        "name": str,
        "warmup_epochs": int,
        "warmup_lr": _NUM,
        "min_lr": _NUM,
        "cooldown_epochs": int,             # Table 9's "10 patient epochs" at min_lr after the cosine
    },
    "ema": {"decay": _NUM},                 # 0 = no EMA (Table 10's "EMA decay 0")
    "distill": {                            # logit distillation (Tables 2, 3, 5)
        "type": str,                        # none | soft | hard
        "use_label": bool,                  # keep the ground-truth loss beside the teacher's
        "alpha": _NUM,                      # teacher weight when use_label: (1-a) CE + a KD
        "tau": _NUM,
        "teacher": _TEACHER,
    },
    "imitation": {                          # module imitation (Eq. 5-9; Tables 4, 5, 7, 9)
        "enabled": bool,
        "scheme": str,                      # none | feature_distillation (lambda out = rel = 0) | module_imitation
        "teacher": _TEACHER,
        "layers": list,                     # block indices (depth order) imitated
        "lambda_times_batch": {"in_norm": _NUM, "in": _NUM, "out": _NUM, "rel": _NUM},
        "lambda_reading": str,              # how Table 10's "lambda x batch size" becomes lambda (imitation.py)
        "epochs": {"feat": int, "rel": int},  # L'_in and L_out stop after `feat`, L_rel after `rel`
    },
    "frd": {                                # SiT feature recalibration distillation (engine/frd.py)
        "enabled": bool,
        "teacher": _TEACHER,                # the LV-ViT the student slims (L_token, L_logits)
        "cnn_teacher": _TEACHER,            # the extra CNN teacher of L_hard
        "lambda_token": _NUM,
        "lambda_logits": _NUM,
        "lambda_hard": _NUM,
        "tau": _NUM,
        "teacher_blocks": str,              # same (the student's own LV-ViT) | uniform (Table 5's others)
    },
    "token_labeling": {                     # LV-ViT training (engine/token_labeling.py)
        "enabled": bool,
        "label_root": (str, type(None)),    # <root>/<class>/<image stem>.pt maps; null = generated (smoke)
        "label_size": int,                  # token grid of the targets (14 at 224)
        "cls_weight": _NUM,
        "dense_weight": _NUM,
        "mix_token": bool,
        "generated_size": int,              # map size of generated maps (smoke runs)
        "label_teacher": _TEACHER,          # label_root null: a trained model makes the maps (learn scale)
        "label_img_size": int,              # the image size label_teacher sees (default data.img_size)
    },
}
CHOICES = {"amp": {"bf16", "fp16", "off"}, "distill.type": {"none", "soft", "hard"},
           "data.re_mode": {"pixel", "const", "rand"},
           "imitation.scheme": {"none", "feature_distillation", "module_imitation"},
           "imitation.lambda_reading": {"as_printed", "divided_by_batch", "times_batch"},
           "frd.teacher_blocks": {"same", "uniform"}}


MODEL_KEYS = ("name", "model")  # what names the model of a section with `kwargs` (student, teachers)


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge: `override`'s leaves win, dicts merge, lists are replaced. A dict with
    `_replace: true` replaces instead of merging (e.g. another teacher's kwargs in a smoke section),
    and a section whose override names another model drops the base's `kwargs` (they were that model's)."""
    out = copy.deepcopy(base)
    if any(k in override and k in base and override[k] != base[k] for k in MODEL_KEYS):
        out.pop("kwargs", None)
    for key, value in override.items():
        if isinstance(value, dict) and value.get("_replace"):
            out[key] = {k: copy.deepcopy(v) for k, v in value.items() if k != "_replace"}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read(path: Path, seen: tuple = ()) -> dict:
    if path in seen:
        raise RecipeError(f"{path}: `base:` chain loops back to itself")
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of fields")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = _read((path.parent / base).resolve(), seen + (path,))
    # the smoke sections merge too, so that a child can refine its base's smoke settings
    return merge(parent, data)


def _validate(node: dict, schema: dict, where: str, path: Path) -> None:
    for key, value in node.items():
        name = f"{where}{key}"
        if key not in schema:
            raise RecipeError(f"{path}: unknown field `{name}`")
        expected = schema[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise RecipeError(f"{path}: field `{name}` must be a mapping")
            _validate(value, expected, name + ".", path)
            continue
        ok = isinstance(value, expected) and not (isinstance(value, bool) and expected in (int, _NUM))
        if not ok:
            raise RecipeError(f"{path}: field `{name}` has a wrong type ({value!r})")
        if name in CHOICES and value not in CHOICES[name]:
            raise RecipeError(f"{path}: field `{name}` is {value!r}, expected one of {sorted(CHOICES[name])}")


REQUIRED = ("model.name", "model.num_classes", "epochs", "batch_size", "optimizer.name", "optimizer.lr_base",
            "data.img_size")


def get(recipe: dict, dotted: str, default=None):
    """`get(recipe, "optimizer.weight_decay")`: a field by its dotted path (the specs' `recipe.<path>`)."""
    node = recipe
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _check_imitation_scheme(recipe: dict, path: Path) -> None:
    """The scheme a table prints (Table 7) must be what the numbers do."""
    imitation = recipe.get("imitation", {})
    scheme, enabled = imitation.get("scheme"), imitation.get("enabled", False)
    lambdas = imitation.get("lambda_times_batch", {})
    ok = {None: True, "none": not enabled,
          "feature_distillation": enabled and not lambdas.get("out") and not lambdas.get("rel"),
          "module_imitation": enabled and bool(lambdas.get("out"))}[scheme]
    if not ok:
        raise RecipeError(f"{path}: field `imitation.scheme` is {scheme!r} but imitation.enabled / "
                          "lambda_times_batch say otherwise")


def _check_objectives(recipe: dict, path: Path) -> None:
    """SiT's objectives replace the logit-distillation and mixup paths they cannot share."""
    frd, labeling = recipe.get("frd", {}).get("enabled"), recipe.get("token_labeling", {}).get("enabled")
    if frd and labeling:
        raise RecipeError(f"{path}: field `token_labeling.enabled`: token labeling trains LV-ViT teachers, "
                          "FRD trains SiT students; a recipe does one of them")
    if (frd or labeling) and recipe.get("distill", {}).get("type", "none") != "none":
        raise RecipeError(f"{path}: field `distill.type` must be none with frd/token_labeling (FRD has its "
                          "own logit and hard-label terms)")
    data = recipe.get("data", {})
    if labeling and (data.get("mixup", 0) or data.get("cutmix", 0)):
        raise RecipeError(f"{path}: field `data.mixup`/`data.cutmix` must be 0 with token labeling (the "
                          "token-labeling recipe mixes with MixToken instead)")
    if recipe.get("optimizer", {}).get("recalibration_lr_base") is not None and not frd:
        raise RecipeError(f"{path}: field `optimizer.recalibration_lr_base` needs frd.enabled (it is the lr of "
                          "SiT's recalibration branch)")
    if recipe.get("model", {}).get("init_from") == "teacher" and not frd:
        raise RecipeError(f"{path}: field `model.init_from` is teacher but frd is not enabled")


def _scale_imitation_epochs(recipe: dict, smoke: dict, full_epochs) -> None:
    """At smoke scale the imitation epochs follow the row: scaled by smoke epochs / full epochs,
    rounded half up, a non-zero count kept at one or more (unless the smoke section sets them)."""
    epochs = get(recipe, "imitation.epochs")
    if not isinstance(epochs, dict) or get(smoke, "imitation.epochs") is not None or not full_epochs:
        return
    ratio = recipe["epochs"] / full_epochs
    for key, value in epochs.items():
        if isinstance(value, int) and value > 0:
            epochs[key] = max(1, math.floor(value * ratio + 0.5))


SMOKE_TEACHERS = Path(__file__).resolve().parents[2] / "recipes" / "smoke_teachers.yaml"


def _reduce_logit_teacher(recipe: dict, smoke: dict) -> None:
    """At smoke scale the logit teacher is the row's own, at its family's reduced shape."""
    teacher = get(recipe, "distill.teacher")
    if not isinstance(teacher, dict) or not teacher.get("model"):
        return
    reduced = (yaml.safe_load(SMOKE_TEACHERS.read_text()) or {}).get(teacher["model"])
    if not reduced:
        return
    kwargs = dict(reduced.get("kwargs", {}))
    if "img_size" in kwargs:
        kwargs["img_size"] = recipe["data"]["img_size"]
    teacher["kwargs"] = {**teacher.get("kwargs", {}), **kwargs, **(get(smoke, "distill.teacher.kwargs") or {})}
    if reduced.get("constructor"):
        teacher.setdefault("constructor", reduced["constructor"])


SCALES = ("full", "smoke", "learn")


def load_recipe(path, scale: str = "full") -> dict:
    """Read a recipe, resolve `base:`, apply the `smoke:` section if `scale == "smoke"` (then `learn:` if
    `scale == "learn"`), validate.

    Raises RecipeError with a one-line message naming the file and the bad field.
    """
    if scale not in SCALES:
        raise RecipeError(f"scale must be one of {', '.join(SCALES)}, not {scale!r}")
    path = Path(path).resolve()
    recipe = _read(path)
    smoke = recipe.pop("smoke", {}) or {}
    learn = recipe.pop("learn", {}) or {}
    _validate(smoke, SCHEMA, "smoke.", path)  # checked at every scale, so typos show up early
    _validate(learn, SCHEMA, "learn.", path)
    if scale in ("smoke", "learn"):
        full_epochs = recipe.get("epochs")
        if scale == "learn":
            smoke = merge(smoke, learn)
        recipe = merge(recipe, smoke)
        _scale_imitation_epochs(recipe, smoke, full_epochs)
        _reduce_logit_teacher(recipe, smoke)
    _validate(recipe, SCHEMA, "", path)
    _check_imitation_scheme(recipe, path)
    _check_objectives(recipe, path)
    for field in REQUIRED:
        if get(recipe, field) is None:
            raise RecipeError(f"{path}: required field `{field}` is missing")
    recipe["scale"] = scale
    recipe["path"] = str(path)
    return recipe
