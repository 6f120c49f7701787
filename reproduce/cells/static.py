"""Params and MACs cells: each model built once for counting (fvcore), every count cached on its own."""
from __future__ import annotations

from reproduce import measure

KINDS = ("params", "macs")


class StaticCounts:
    """Counts the params and MACs cells of a table run (`run`: runner.TableRun, which says which
    cells are needed, keeps the values and remembers why a model could not be measured)."""

    def __init__(self, run):
        self.run = run

    def key(self, target, kind: str) -> str:
        macs = kind == "macs"
        return measure.cache_key(kind=kind, model=target.model, kwargs=target.kwargs, form=target.form,
                                 img_size=target.img_size if macs else None,
                                 convention=target.convention if macs else None, code=self.run.fingerprint)

    def measure(self, progress) -> None:
        run = self.run
        groups: dict = {}
        for row, column in run._needed_cells([k for k in KINDS if run.wanted(k)]):
            groups.setdefault(run.target(row, column), []).append(column)
        task = progress.add_task(f"{run.spec.id}: params & MACs", total=len(groups))
        for target, columns in groups.items():
            progress.update(task, description=f"{run.spec.id}: params & MACs · {target.label}")
            model = None
            for column in columns:
                macs = column.kind == "macs"
                value = run.cache.get(self.key(target, column.kind))
                if value is None:
                    model = model or run._measure_or_fail(target, lambda: target.build(for_counting=True))
                    if model is None:
                        break
                    value = run._measure_or_fail(
                        target, lambda m=model: measure.count_macs(m, target.img_size, target.convention) if macs
                        else measure.count_params(m))
                    if value is None:
                        break
                    run.cache.put(self.key(target, column.kind), value)
                run.values[(target.row, column.id)] = value
            progress.advance(task)
