"""Every note text a results cell carries, in one place (the CSV's `note`, the Markdown's footnotes).

The words are a contract with the committed results: a change here changes results/ (regenerate the
tables it touches, and say so in the commit).
"""
from __future__ import annotations


# -- any cell ------------------------------------------------------------------------------------
def cited(reason: str) -> str:
    return f"cited: {reason}"


def pending(why) -> str:
    return f"pending: {why}"


MODEL_NOT_IMPLEMENTED = pending("model not implemented")
NOT_MEASURED = pending("not measured")
NO_PROTOCOL = pending("no throughput protocol for this table")


def coarser_printing(how: str) -> str:
    return f"the printed value is the measured one {how} at the printed precision."


def deviation(spec_id: str, declared_status: str, reason: str, status: str) -> str:
    said = declared_status.replace("_", " ")
    if status == declared_status:
        return f"Accepted {said} (declared in {spec_id}.yaml): {reason}"
    return f"The spec declares this cell a {said} ({reason}), but it is {status} now."


# -- accuracy ------------------------------------------------------------------------------------
def accuracy_command(spec, row_id: str, column_id: str | None = None) -> str:
    column = f" --column {column_id}" if column_id in spec.rows[row_id].recipes else ""
    return (f"reproduce train {spec.id} {row_id}{column} --data /path/to/imagenet --scale full --nproc 8 "
            f"&& reproduce table {spec.id} --columns accuracy")


def eval_command(spec, row, column, model: str) -> str:
    """The `reproduce eval` line whose result.json provenance.accept takes for this cell: the
    model, the row's image size and form (a default left out), written to the cell's run folder."""
    size = f" --img-size {row.img_size}" if row.img_size != 224 else ""
    deploy = " --deploy" if (column.form or row.form) == "deploy" else ""
    return (f"reproduce eval {model} --checkpoint FILE --data /path/to/imagenet{size}{deploy} "
            f"--output runs/{spec.id}/{spec.run_name(row.id, column.id)}")


def accuracy_derived_pending(column) -> str:
    return f"pending: computed from {column.of} and {column.over or 'the baseline row'}, which need ImageNet-1k"


def accuracy_pending(spec, row, column, refused: str | None, release, recipe_exists: bool, model: str | None) -> str:
    """What a pending accuracy cell needs: why a result was refused, the released weights to evaluate
    (the fast path first: minutes of evaluation instead of a training run), the training command."""
    prefix = f"{refused}. " if refused else ""
    if release is not None:
        prefix += (f"released weights {release.local_name} ({release.project}): `reproduce table {spec.id} "
                   f"--columns accuracy --weights DIR --data /path/to/imagenet`; or ")
    if recipe_exists:
        return f"{prefix}needs ImageNet-1k: `{accuracy_command(spec, row.id, column.id)}`"
    if model is None:  # a row of several models (one per column): its cell note names each
        return f"{prefix}needs ImageNet-1k and the trained weights of this column's model"
    return f"{prefix}needs ImageNet-1k and trained weights: `{eval_command(spec, row, column, model)}`"


def not_json(path) -> str:
    return f"{path} is not valid JSON"


def refused(shown_path: str, reason: str) -> str:
    return f"{shown_path} refused: {reason}"


# -- throughput ----------------------------------------------------------------------------------
def timing_spread(result: dict) -> str:
    spread = (f"batch {result['batch_size']}, median of {len(result['samples'])} timings, "
              f"range {result['min']:.1f}–{result['max']:.1f}")
    return "; ".join([spread, *(result.get("notes") or [])])


def over_rounds(rounds: int) -> str:
    return f"over {rounds} interleaved rounds"


FROM_TIMING_RANGES = "from the two timing ranges"


def gain_range(kind: str, low: float, high: float, how: str) -> str:
    shown = "{:+.1f} to {:+.1f}" if kind == "gain" else "{:.2f} to {:.2f}"
    return ("median of per-round ratios; " if "rounds" in how else "") + f"range {shown.format(low, high)} {how}."


def gain_off_paper_device(ours: str, protocol_text: str, paper_device: str) -> str:
    return (f"Gain measured on {ours} ({protocol_text}); the paper's is on {paper_device}: gains travel better "
            "than absolute images/s, but the relative cost of layers (pooling, norms, matmuls) still differs "
            "between devices.")


def device_bound(spec_id: str, paper_device: str, ours: str, spread: str) -> str:
    return (f"absolute images/s are device-bound: printed on {paper_device}, measured here on {ours} "
            f"({spread}); the gain columns carry the comparison; to compare absolutes run "
            f"`reproduce table {spec_id} --columns throughput --device cuda` on {paper_device}.")


INTERLEAVED = ", interleaved with the baseline of each gain"


# -- settings ------------------------------------------------------------------------------------
def setting_unresolvable(why) -> str:
    return f"setting not resolvable yet ({why}); fix the spec or recipe"


def setting_declared(where: str, value) -> str:
    return f"declared: {where} gives {value}; nothing reads it from a model or a recipe."


def setting_declared_mismatch(where: str, value, reported) -> str:
    return f"the spec declares {value} ({where}), the paper prints {reported}."


def setting_read(where: str, measured_at: int | None = None) -> str:
    extra = f"read from {where}."
    if measured_at is not None:
        extra += f" Params, MACs and throughput are measured at the spec's img_size {measured_at}."
    return extra
