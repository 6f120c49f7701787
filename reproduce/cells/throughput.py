"""Throughput cells and the gains between them: the table's protocol, interleaved timing groups
(cached as a whole), per-round ratios, and what a throughput cell says off the paper's device."""
from __future__ import annotations

import datetime as dt
import hashlib
import statistics
from dataclasses import replace

from reproduce import measure
from reproduce.cells import notes
from reproduce.registry import DERIVED_KINDS, load_protocol


class Throughput:
    """Times the throughput cells of a table run (`run`: runner.TableRun) and answers for the
    gains and ratios computed from them."""

    def __init__(self, run, protocol_overrides: dict | None = None):
        self.run = run
        self.protocol_spec = load_protocol(run.spec.protocol) if run.spec.protocol else None
        self.protocol_overrides = {k: v for k, v in (protocol_overrides or {}).items() if v is not None}
        self.protocols_used: dict[int, measure.Protocol] = {}
        self.ranges: dict[tuple[str, str], tuple[float, float]] = {}  # timing min/max of throughput cells
        self.samples: dict[tuple[str, str], tuple] = {}   # (timing session, per-round images/s)

    def protocol(self, img_size: int) -> measure.Protocol:
        if img_size not in self.protocols_used:
            protocol = measure.Protocol.for_device(self.protocol_spec, self.run.device, img_size)
            # e.g. the GPU session's fewer passes (batch size and dtype stay the paper's)
            self.protocols_used[img_size] = replace(protocol, **self.protocol_overrides)
        return self.protocols_used[img_size]

    def pairs(self, targets) -> list[tuple]:
        """Pairs of targets whose throughput ratio a gain/ratio column reports."""
        run, spec, pairs = self.run, self.run.spec, []
        for col in spec.columns_of_kind(*DERIVED_KINDS):
            of = spec.columns[col.of]
            if of.kind != "throughput":
                continue
            for row in spec.rows.values():
                if col.over:
                    a, b = run.target(row, of), run.target(row, spec.columns[col.over])
                elif row.baseline:
                    a, b = run.target(row, of), run.target(spec.rows[row.baseline], of)
                else:
                    continue
                if a in targets and b in targets and a != b and (a, b) not in pairs and (b, a) not in pairs:
                    pairs.append((a, b))
        return pairs

    def measure(self, progress) -> None:
        if self.protocol_spec is None:
            return
        run = self.run
        cells = run._needed_cells(["throughput"])
        targets = {run.target(row, column) for row, column in cells}
        results: dict = {}

        # Every target linked to another through a gain is timed in one interleaved group
        # (measure.time_interleaved), so that each gain compares timings taken side by side. A group
        # is cached as a whole (its members' key names the group) and timed again as a whole, so a
        # gain never pairs timings of two sessions.
        groups = connected_groups(sorted(targets, key=str), self.pairs(targets))
        group_of = {t: group for group in groups for t in group}

        def key(t):
            return measure.cache_key(kind="throughput", model=t.model, kwargs=t.kwargs, form=t.form,
                                     img_size=t.img_size, protocol=self.protocol(t.img_size).__dict__,
                                     device=run.device.tag, code=run.fingerprint,
                                     group=sorted(f"{u.model}|{u.form}|{u.img_size}|{u.kwargs}" for u in group_of[t]))

        for t in targets:
            if cached := run.cache.get(key(t)):
                results[t] = cached
        todo = [g for g in groups if any(t not in results for t in g)]
        task = progress.add_task(f"{run.spec.id}: throughput", total=len(todo))
        for group in todo:
            progress.update(task, description=f"{run.spec.id}: throughput · {' vs '.join(t.label for t in group)}")
            timers = {}
            for t in group:
                timer = run._measure_or_fail(
                    t, lambda: measure.Timer(t.build(), t.img_size, self.protocol(t.img_size), run.device))
                if timer:
                    timers[t] = timer
            session = hashlib.sha1(f"{dt.datetime.now().isoformat()}{sorted(map(str, timers))}".encode()).hexdigest()[:12]
            for t, result in measure.time_interleaved(timers).items():
                results[t] = {**result, "session": session, "interleaved_with": [u.label for u in timers if u != t]}
                run.cache.put(key(t), results[t])
            timers.clear()
            progress.advance(task)
        for row, column in cells:
            result = results.get(run.target(row, column))
            if result:
                self.record(row.id, column.id, result)

    def record(self, row_id: str, column_id: str, result: dict) -> None:
        """Keep one throughput cell's timing (`measure.time_interleaved`'s form of a result)."""
        self.run.values[(row_id, column_id)] = result["img_per_s"]
        self.ranges[(row_id, column_id)] = (result["min"], result["max"])
        self.samples[(row_id, column_id)] = (result.get("session"), result["samples"])
        self.run.notes[(row_id, column_id)] = notes.timing_spread(result)

    # -- gains and ratios of throughputs ----------------------------------------------------------
    def paired_ratios(self, operands) -> list[float] | None:
        """Per-round ratios of two throughputs timed interleaved in one session, else None."""
        (sa, a), (sb, b) = (self.samples.get(o, (None, [])) for o in operands)
        if sa is None or sa != sb or len(a) != len(b) or not a:
            return None
        return [x / y for x, y in zip(a, b)]

    def ratio(self, operands, of: float, over: float) -> float:
        """Throughputs timed side by side: the median of the per-round ratios cancels drift that a
        ratio of two medians keeps."""
        ratios = self.paired_ratios(operands)
        return statistics.median(ratios) if ratios else of / over

    def derived_range(self, column, operands) -> tuple[float, float, str] | None:
        """A throughput gain's range: over the paired rounds if timed side by side, else the
        crude bound from the two timing ranges (slowest over fastest and the reverse)."""
        if not operands or not all(o in self.ranges for o in operands):
            return None
        scale = (lambda r: 100 * (r - 1)) if column.kind == "gain" else (lambda r: r)
        ratios = self.paired_ratios(operands)
        if ratios:
            return scale(min(ratios)), scale(max(ratios)), notes.over_rounds(len(ratios))
        (a_lo, a_hi), (b_lo, b_hi) = (self.ranges[o] for o in operands)
        return scale(a_lo / b_hi), scale(a_hi / b_lo), notes.FROM_TIMING_RANGES

    # -- what the cells say -----------------------------------------------------------------------
    def on_paper_device(self) -> bool:
        return measure.same_device(self.protocol_spec.get("paper_device", ""), self.run.env["device"])

    def protocol_used_text(self) -> str:
        return "; ".join(f"@{size}: {p.describe()}" for size, p in sorted(self.protocols_used.items())) or "cached"

    def derived_cell(self, row, column, value, done, cell_notes: list):
        """A gain or ratio of throughputs: its value with its range, and the device it was taken on."""
        spread = self.derived_range(column, self.run._operands(row, column))
        if spread:
            low, high, how = spread
            cell_notes.insert(0, notes.gain_range(column.kind, low, high, how))
        if not self.on_paper_device():
            cell_notes.append(notes.gain_off_paper_device(self.run.env["device"], self.protocol_used_text(),
                                                          self.protocol_spec.get("paper_device")))
        return done(None, value, spread=spread[:2] if spread else None)

    def cell(self, ref, value, done):
        """An absolute throughput: compared with the paper's only on the paper's device."""
        extra = self.run.notes.get((ref.row, ref.column), "")
        paper_device = self.protocol_spec.get("paper_device", "the paper's GPU")
        spread = self.ranges.get((ref.row, ref.column))
        if self.on_paper_device():
            return done(None, value, extra, spread=spread)
        why = notes.device_bound(self.run.spec.id, paper_device, self.run.env["device"], extra)
        return done("pending", value, extra=why, device_bound=True, spread=spread)

    def meta(self) -> dict:
        meta = {}
        if self.protocol_spec:
            meta["paper protocol"] = self.protocol_spec.get("summary", self.protocol_spec.get("name"))
            for size, proto in sorted(self.protocols_used.items()):
                meta[f"protocol run here @{size}"] = proto.describe() + notes.INTERLEAVED
            if self.protocol_overrides:
                meta["protocol overridden"] = ", ".join(f"{k}={v}" for k, v in self.protocol_overrides.items())
        return meta


def connected_groups(items: list, pairs: list[tuple]) -> list[list]:
    """Items joined by pairs into groups (connected components), in first-seen order."""
    group_of = {item: [item] for item in items}
    for a, b in pairs:
        if group_of[a] is not group_of[b]:
            merged = group_of[a] + group_of[b]
            for item in merged:
                group_of[item] = merged
    seen, groups = set(), []
    for item in items:
        if id(group_of[item]) not in seen:
            seen.add(id(group_of[item]))
            groups.append(group_of[item])
    return groups
