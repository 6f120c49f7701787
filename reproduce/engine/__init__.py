"""Training and evaluation of the accuracy cells: recipes, data, distillation, DDP, resume.

`reproduce train TABLE ROW` and `reproduce eval MODEL` (see `cli.py`) are the entry points;
`train.py` is the training loop, to be read top to bottom; `dryrun.py` proves a recipe at its real
configuration with one optimizer step.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path


class EngineError(Exception):
    """A problem the user can fix (a path, a recipe field, a checkpoint); the message is one line."""


def _show(path) -> str:
    path, root = Path(path), Path(__file__).resolve().parents[2]
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


@contextlib.contextmanager
def recipe_field(recipe: dict, field: str):
    """Turn any failure inside the block into a one-line EngineError naming the recipe file and
    `field` (refined to `<field>.kwargs.<name>` for a keyword argument the model does not take)."""
    try:
        yield
    except EngineError as err:
        message = str(err)
        if message.startswith(_show(recipe["path"])) or message.startswith(str(recipe["path"])):
            raise
        raise EngineError(f"{_show(recipe['path'])}: field `{field}`: {message}") from None
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError, AttributeError, ImportError) as err:
        message = (str(err).strip().splitlines() or [type(err).__name__])[0]
        # "got an unexpected keyword argument 'x'" (Python), "... argument(s): ['x']" (timm)
        unexpected = re.search(r"unexpected keyword argument(?:\(s\))?:? \[?'(\w+)'", message)
        if unexpected:
            field = f"{field if field.endswith('.kwargs') else field + '.kwargs'}.{unexpected[1]}"
        raise EngineError(f"{_show(recipe['path'])}: field `{field}`: {type(err).__name__}: {message}") from None
