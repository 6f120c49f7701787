"""How well the diff's guard test (reproduce/guards.py) tells a regression from this machine's noise.

    PYTHONPATH=$PWD python scripts/guard_power.py --table riformer-6 --reps 20 --plant slow10

Each repetition is the guard step of `reproduce diff T --remeasure`, `guards.remeasure` (build the
gain's two models, warm up, time them in alternating pairs, judge the median of the pair ratios
against the committed value); clean and planted repetitions alternate, so that whatever load the
machine carries hits both alike. The committed value is this machine's results file when it has one,
else one clean guard timing, the value `reproduce diff T --remeasure --update`
writes. It prints one line per repetition and the two rates; exit 0 when the plant is caught and the
clean tree passes in at least 95 % of the repetitions each (19 of 20).

Plants (for this script and the tests only; nothing in the suite's CLI reaches them):
  slow10        the gain's own model sleeps, after each forward pass, 10 % of that pass's own time
  spin10        the same 10 % as busy CPU work instead of a sleep
  pool5         PoolFormer's token mixer pools 5x5 instead of 3x3 (same params and MACs)
  sleep-deploy  every RIFormer block in its deploy form sleeps 3 ms per forward pass
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import pandas as pd

from reproduce import guards, measure, report
from reproduce.registry import load_table
from reproduce.runner import TableRun, results_paths


def _hooked(model, extra: float, busy: bool):
    """Make `model` take `extra` × its own time longer per forward pass (a sleep, or busy work)."""
    started = {}

    def before(module, inputs):
        started["t"], started["wait"] = time.perf_counter(), guards.run_queue_wait()

    def after(module, inputs, output):
        own = time.perf_counter() - started["t"] - (guards.run_queue_wait() - started["wait"])
        if not busy:
            time.sleep(extra * own)
            return
        start, wait = time.perf_counter(), guards.run_queue_wait()
        while time.perf_counter() - start - (guards.run_queue_wait() - wait) < extra * own:
            pass

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after)
    return model


@contextlib.contextmanager
def slower_model(model_name: str, form: str, extra: float = 0.10, busy: bool = False):
    """While active, `measure.build_model(model_name, form=form)` returns a model `extra` slower."""
    plain = measure.build_model

    def build(name, model_kwargs=None, form_="train", **kwargs):
        model = plain(name, model_kwargs, form_, **kwargs)
        return _hooked(model, extra, busy) if (name, form_) == (model_name, form) else model

    measure.build_model = build
    try:
        yield
    finally:
        measure.build_model = plain


@contextlib.contextmanager
def pooling(size: int = 5):
    """PoolFormer's token mixer with a `size`x`size` window (the same parameters and MACs)."""
    from riformer import metaformer

    plain = metaformer.Pooling.__init__

    def init(self, pool_size=3):
        plain(self, size)

    metaformer.Pooling.__init__ = init
    try:
        yield
    finally:
        metaformer.Pooling.__init__ = plain


@contextlib.contextmanager
def sleep_in_deploy(seconds: float = 0.003):
    """Every RIFormer block in its deploy form sleeps `seconds` per forward pass."""
    from riformer import metaformer

    plain = metaformer.RIFormerBlock.forward

    def forward(self, x):
        if self.deploy:
            time.sleep(seconds)
        return plain(self, x)

    metaformer.RIFormerBlock.forward = forward
    try:
        yield
    finally:
        metaformer.RIFormerBlock.forward = plain


def guard_model(spec, guard) -> tuple[str, str]:
    """The (model, form) of the gain's own throughput: the one whose regression the guard guards."""
    run = TableRun(spec, show_progress=False)
    row, column = spec.rows[guard[0]], spec.columns[guard[1]]
    (r, c), _ = run._operands(row, column)
    target = run.target(spec.rows[r], spec.columns[c])
    return target.model, target.form


def plant(name: str, spec, guard):
    model, form = guard_model(spec, guard)
    return {"slow10": lambda: slower_model(model, form, 0.10),
            "spin10": lambda: slower_model(model, form, 0.10, busy=True),
            "pool5": lambda: pooling(5),
            "sleep-deploy": lambda: sleep_in_deploy(0.003)}[name]()


def committed(spec, min_pairs: int, max_pairs: int) -> tuple[pd.DataFrame, str]:
    csv_path, _ = results_paths(spec.id, "cpu")
    if csv_path.exists():
        return report.read_results(csv_path), f"{csv_path} (this machine's committed results)"
    nothing = pd.DataFrame(columns=["row", "column", "measured"])
    cells, _, _ = guards.remeasure(spec, "cpu", nothing, min_pairs, max_pairs)
    return cells, "one clean guard timing (what `reproduce diff --remeasure --update` writes)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", default="riformer-6")
    parser.add_argument("--reps", type=int, default=20, help="repetitions of each, clean and planted")
    parser.add_argument("--plant", default="slow10", choices=["slow10", "spin10", "pool5", "sleep-deploy"])
    parser.add_argument("--min-pairs", type=int, default=guards.MIN_PAIRS)
    parser.add_argument("--max-pairs", type=int, default=guards.MAX_PAIRS)
    args = parser.parse_args(argv)
    spec = load_table(args.table)
    if not spec.guards:
        sys.exit(f"{args.table} has no guards: in its spec")
    guard = spec.guards[0]
    name = "/".join(guard)
    print(f"{name}: {args.min_pairs}-{args.max_pairs} pairs a diff, plant {args.plant}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    results, where = committed(spec, args.min_pairs, args.max_pairs)
    cell = results[(results.row == guard[0]) & (results.column == guard[1])].measured.iloc[0]
    print(f"committed {cell}: {where}", flush=True)
    caught = passed = 0
    start = time.time()
    for rep in range(1, args.reps + 1):
        for planted in (False, True):
            with plant(args.plant, spec, guard) if planted else contextlib.nullcontext():
                _, verdicts, _ = guards.remeasure(spec, "cpu", results, args.min_pairs, args.max_pairs)
            verdict = next(v for v in verdicts if v.name == name)
            if planted:
                caught += not verdict.holds
            else:
                passed += verdict.holds
            print(f"{rep:2d} {'planted' if planted else 'clean  '} load {os.getloadavg()[0]:4.1f} "
                  f"{'FAIL' if not verdict.holds else 'ok  '} {verdict.line()}", flush=True)
    print(f"{args.plant} caught in {caught} of {args.reps}; clean tree passed {passed} of {args.reps} "
          f"({time.time() - start:.0f} s)")
    return 0 if min(caught, passed) >= 0.95 * args.reps else 1


if __name__ == "__main__":
    sys.exit(main())
