"""Training and evaluation of the accuracy cells: recipes, data, distillation, DDP, resume.

`reproduce train TABLE ROW` and `reproduce eval MODEL` (see `cli.py`) are the entry points;
`train.py` is the training loop, to be read top to bottom.
"""


class EngineError(Exception):
    """A problem the user can fix (a path, a recipe field, a checkpoint); the message is one line."""
