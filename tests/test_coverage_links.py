"""`reproduce list` coverage asks the dry run's stored outcome and the weights manifest."""
import json

from reproduce import buildable, registry
from reproduce.engine import dryrun
from reproduce.engine.recipe import load_recipe


def test_accuracy_coverage_from_released_weights_is_the_manifest():
    spec = registry.load_table("riformer-6")
    assert buildable.released_weights(spec, "riformer_s12", "top1")       # mmpretrain's release
    assert not buildable.released_weights(spec, "mlp_mixer_b16", "top1")   # nothing released at IN-1k


def test_a_stored_dry_run_outcome_decides_whether_a_recipe_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(dryrun, "CACHE_DIR", tmp_path)
    path = registry.RECIPES / "riformer" / "table2" / "identity_label_free_soft.yaml"
    key = dryrun.cache_key(load_recipe(path))
    (tmp_path / f"{key}.json").write_text(json.dumps({"ok": False, "error": f"{path}: field `model.kwargs.x`: planted"}))
    ok, reason = buildable.recipe_runs(path)
    assert not ok and "planted" in reason
    (tmp_path / f"{key}.json").write_text(json.dumps({"ok": True}))
    assert buildable.recipe_runs(path) == (True, "")
