"""Issue 19, item 1: an accuracy cell is derived from the per-image evidence beside its result.json,
never read from it. Each attack is planted the way a forger would, after a genuine run filled the
cell (result.json and evidence.csv.gz written by the one writer, 50,000 ImageNet-val-shaped lines):
`reproduce verify` must fail the cell with its one-line reason, and `reproduce table` must leave it
pending with the same reason. The re-run of `verify --data` is tested at small scale on generated
data, where the only rule that refuses the result is the count of ImageNet-1k val (set there by
monkeypatching provenance.IMAGENET_VAL, a constant no command line reaches)."""
import json
import shutil

import pytest
import torch
from helpers import one_thread  # noqa: F401
from test_accuracy_provenance import ROW, genuine, hand_fill, invoke, refused, table, table_cell  # noqa: F401

from reproduce import evidence, provenance

FILE = evidence.FILE


def forge(result_path, edit_rows=None, header=None, keep_sha=False, **result_changes):
    """Rewrite the evidence beside `result_path` as a forger would: `edit_rows(rows) -> rows`, header
    fields replaced; then (unless keep_sha) its sha256 in result.json updated to match, and
    `result_changes` (dotted keys) applied to result.json."""
    folder = result_path.parent
    head, rows = evidence.read(folder / FILE)
    rows = edit_rows(rows) if edit_rows else rows
    record = evidence.write(folder / FILE, rows, {**head, **(header or {})})
    result = json.loads(result_path.read_text())
    if not keep_sha:
        result["evidence"] = record
    for dotted, value in result_changes.items():
        node, *path = result, *dotted.split(".")
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    result_path.write_text(json.dumps(result))
    return rows


def verify_fails(results, reason):
    outcome = invoke("verify", "riformer-2", "--results-dir", results)
    assert outcome.exit_code == 1, outcome.output
    line = next(line for line in outcome.output.splitlines() if line.startswith(f"FAIL riformer-2/{ROW}/top1"))
    assert reason in line and "Traceback" not in outcome.output, outcome.output
    return line


def filled(table):
    """A genuine run behind a filled, committed-looking cell; `reproduce verify` says ok."""
    results, runs = table
    path = genuine(runs)
    assert table_cell(results).status == "match"
    outcome = invoke("verify", "riformer-2", "--results-dir", results)
    assert outcome.exit_code == 0, outcome.output
    assert f"ok riformer-2/{ROW}/top1: 73.6400 = its evidence (50000 images)" in outcome.output
    return results, path


def test_evidence_is_small_and_deterministic(table):
    _, runs = table
    path = genuine(runs).parent / FILE
    first = path.read_bytes()
    assert path.stat().st_size < 3_000_000
    genuine(runs)
    assert path.read_bytes() == first  # no time stamp: the same evaluation gives the same file
    head, rows = evidence.read(path)
    assert len(rows) == 50000 and head["run_dir"] == f"riformer-2/{ROW}"


def test_a_typed_result_without_evidence_is_refused(table):
    results, path = filled(table)
    (path.parent / FILE).unlink()
    verify_fails(results, f"its evidence {FILE} is missing beside result.json")
    refused(results, f"its evidence {FILE} is missing beside result.json")
    # typed without any evidence record: every field it lacks is named
    result = json.loads(path.read_text())
    del result["evidence"], result["data"]["files_sha256"]
    path.write_text(json.dumps(result))
    refused(results, "it lacks data.files_sha256, evidence.file, evidence.sha256")


def test_evidence_edited_after_the_run_is_refused(table):
    results, path = filled(table)

    def more_right(rows):  # 500 wrong predictions made right
        wrong = [i for i, (_, target, top5) in enumerate(rows) if top5[0] != target][:500]
        for i in wrong:
            rows[i] = (rows[i][0], rows[i][1], [rows[i][1], *rows[i][2][1:]])
        return rows

    forge(path, more_right, keep_sha=True)
    verify_fails(results, f"its evidence {FILE} changed since the run (sha256 differs)")
    refused(results, f"its evidence {FILE} changed since the run (sha256 differs)")


def test_a_top1_raised_above_its_evidence_is_refused(table):
    results, path = filled(table)
    result = json.loads(path.read_text())
    path.write_text(json.dumps({**result, "top1": 74.5}))
    verify_fails(results, f"its top1 74.5 disagrees with its evidence {FILE} (73.6400 over 50000 images)")
    refused(results, "its top1 74.5 disagrees with its evidence")


def test_evidence_of_49999_images_is_refused(table):
    results, path = filled(table)
    rows = forge(path, lambda rows: rows[1:])
    found = evidence.metrics(rows)
    forge(path, top1=found["top1"], top5=found["top5"], **{"data.files_sha256": evidence.files_sha256(r[0] for r in rows)})
    reason = ("its evidence holds 49999 images of 1000 classes (result.json says 50000), "
              "not the full ImageNet-1k val (50000 images, 1000 classes)")
    verify_fails(results, reason)
    refused(results, reason)
    # without updating the split's file list, the file list is what it names
    results, path = filled(table)
    forge(path, lambda rows: rows[1:])
    refused(results, "its evidence's 49999 images are not the split's file list recorded")


def test_relabelled_targets_are_refused(table):
    """Targets rewritten to the predicted class (every image right), the numbers made consistent."""
    results, path = filled(table)
    rows = forge(path, lambda rows: [(image, top5[0], top5) for image, _, top5 in rows])
    found = evidence.metrics(rows)
    forge(path, top1=found["top1"], top5=found["top5"])
    assert found["top1"] == 100.0
    reason = "its evidence's targets are not the classes their folders name"
    assert "relabelled" in verify_fails(results, reason)
    refused(results, reason)


def test_evidence_copied_from_another_cell_or_checkpoint_is_refused(table):
    results, path = filled(table)
    other = genuine(table[1], row="identity_label_hard", recipe="riformer/table2/identity_label_hard.yaml")
    shutil.copy(other.parent / FILE, path.parent / FILE)
    forge(path)  # its sha256 recorded in this cell's result.json
    reason = f"was written for runs/riformer-2/identity_label_hard, not for runs/riformer-2/{ROW}"
    verify_fails(results, reason)
    refused(results, reason)
    # the header edited to this run folder: it still names the other cell's checkpoint
    forge(path, header={"run_dir": f"riformer-2/{ROW}"})
    refused(results, "(copied from another checkpoint)")


def test_verify_fails_a_hand_filled_cell_and_reports_each_cell(table):
    results, _ = table
    hand_fill(results)
    verify_fails(results, "result.json is behind it (edited by hand?)")
    outcome = invoke("verify", "--all", "--results-dir", results)
    assert outcome.exit_code == 1 and "1 filled accuracy cell(s): 0 verified, 1 failed" in outcome.output


# --- verify --data: the checkpoint run again on a sample of the images --------------------------

@pytest.fixture
def evaluated(table, tmp_path, monkeypatch):
    """`reproduce eval` of a (random) riformer_s12 on generated data into the cell's run folder,
    accepted because IMAGENET_VAL is set to that data's size; returns (results, data, result.json)."""
    import timm

    from reproduce.engine import cells
    from reproduce.engine.data import make_generated_dataset

    results, runs = table
    monkeypatch.setattr(cells, "RUNS", runs)
    data = make_generated_dataset(tmp_path / "gen", classes=4, images_per_class=8, image_size=40)
    torch.manual_seed(0)
    torch.save(timm.create_model("riformer_s12").state_dict(), tmp_path / "a.pth")
    output = runs / "riformer-2" / ROW
    outcome = invoke("eval", "riformer_s12", "--checkpoint", tmp_path / "a.pth", "--data", data, "--workers", 0,
                     "--output", output)
    assert outcome.exit_code == 0, outcome.output
    unpatched = table_cell(results)  # the count rule, and nothing else, refuses it
    assert unpatched.status == "pending", unpatched.note
    assert "refused: data " in unpatched.note and "(validation: 16 images, 4 classes) is not ImageNet-1k val" \
        in unpatched.note, unpatched.note
    monkeypatch.setattr(provenance, "IMAGENET_VAL", {"images": 16, "classes": 4})
    assert table_cell(results).measured != ""
    return results, data, output / "result.json"


def test_verify_data_reruns_the_checkpoint_on_a_sample(evaluated):
    results, data, _ = evaluated
    outcome = invoke("verify", "riformer-2", "--results-dir", results, "--data", data, "--sample", 8)
    assert outcome.exit_code == 0, outcome.output
    assert "(seed 0): top-1 agrees with the evidence on 8/8 (100.0 %)" in outcome.output


def test_verify_data_catches_a_checkpoint_swapped_after_evaluation(evaluated, tmp_path):
    """Another checkpoint put in place, its sha256 written into result.json and the evidence header:
    the evidence is consistent (plain verify passes), the re-run disagrees."""
    import timm

    results, data, path = evaluated
    checkpoint = json.loads(path.read_text())["weights"]["path"]
    torch.manual_seed(1)
    torch.save(timm.create_model("riformer_s12").state_dict(), checkpoint)
    sha = provenance.file_sha256(checkpoint)
    forge(path, header={"checkpoint_sha256": sha}, **{"weights.sha256": sha})
    assert invoke("verify", "riformer-2", "--results-dir", results).exit_code == 0
    outcome = invoke("verify", "riformer-2", "--results-dir", results, "--data", data, "--sample", 16)
    assert outcome.exit_code == 1, outcome.output
    assert "the checkpoint does not compute its evidence (need 99%)" in outcome.output, outcome.output


def test_verify_data_refuses_another_split(evaluated, tmp_path):
    from reproduce.engine.data import make_generated_dataset

    results, _, _ = evaluated
    other = make_generated_dataset(tmp_path / "other", classes=4, images_per_class=6, image_size=40)
    outcome = invoke("verify", "riformer-2", "--results-dir", results, "--data", other, "--sample", 4)
    assert outcome.exit_code == 1
    assert "is not the split it was evaluated on (its file list differs)" in outcome.output, outcome.output
