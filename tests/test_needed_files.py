"""`reproduce train` checks every file a real run loads before any work starts, and says in one line
what is missing and how to get it; `reproduce weights TABLE` lists those files (engine/dryrun.py)."""
from pathlib import Path

from click.testing import CliRunner

from reproduce.cli import main
from reproduce.engine.dryrun import missing_files, needed_files
from reproduce.engine.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_only_the_teachers_a_run_loads_are_needed():
    plain = dict(needed_files(load_recipe(RECIPES / "riformer/table2/identity_label_no_teacher.yaml")))
    assert "distill.teacher.checkpoint" not in plain  # distill.type none: base.yaml's teacher stays unloaded
    full = dict(needed_files(load_recipe(RECIPES / "riformer/table6/riformer_s12.yaml")))
    assert full["distill.teacher.checkpoint"] == "checkpoints/gfnet-h-b.pth"
    sit = dict(needed_files(load_recipe(RECIPES / "sit/sit_ti.yaml")))
    assert "frd.cnn_teacher.checkpoint" not in sit and sit["frd.teacher.checkpoint"] == "checkpoints/sit_lvvit_ti.pth"
    assert "frd.cnn_teacher.checkpoint" in dict(needed_files(load_recipe(RECIPES / "sit/sit_ti_dist.yaml")))
    assert needed_files(load_recipe(RECIPES / "riformer/table6/riformer_s12.yaml", scale="smoke")) == []  # random at smoke


def test_a_real_run_without_its_files_stops_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints/ is relative to where the user runs it: absent here
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    (tmp_path / "imagenet" / "validation").mkdir()
    output = tmp_path / "out"
    result = CliRunner().invoke(main, ["train", "riformer-6", "riformer_s12", "--data", str(tmp_path / "imagenet"),
                                       "--output", str(output)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line, = [l for l in result.output.splitlines() if l.strip()]
    assert "riformer-6/riformer_s12 cannot start; missing: checkpoints/gfnet-h-b.pth (distill.teacher.checkpoint; " \
           "`reproduce weights riformer-6 --download` (saves it as checkpoints/gfnet-h-b.pth))" in line
    assert "checkpoints/poolformer_s12.pth.tar (imitation.teacher.checkpoint" in line
    assert not output.exists()  # nothing started
    # With the files there, only the data is left to check: a data folder without validation/ is named.
    for name in ("gfnet-h-b.pth", "poolformer_s12.pth.tar"):
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        (tmp_path / "checkpoints" / name).write_bytes(b"")
    (tmp_path / "imagenet" / "validation").rmdir()
    recipe = load_recipe(RECIPES / "riformer/table6/riformer_s12.yaml")
    assert missing_files(recipe, str(tmp_path / "imagenet")) == [
        f"data path {tmp_path / 'imagenet'} has no `validation` folder "
        f"(expected {tmp_path / 'imagenet'}/validation/<class>/<image>)"]
    assert "ImageNet-1k (pass --data" in missing_files(recipe, None, need_data=True)[0]


def test_weights_lists_the_teacher_files_of_a_tables_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["weights", "sit-2", "--weights", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    section = result.output.split("sit-2: teacher/init files its recipes load in a real run\n")[1]
    section = " ".join(section.split())  # the listing wraps at 80 columns
    assert "checkpoints/sit_lvvit_ti.pth (2 recipes), Sense-X/SiT: missing get: a share page (Sense-X/SiT): open " \
           "https://drive.google.com/file/d/1OAVDvMosOIGTEL4dku8WtC50Dn6k0ngJ/view?usp=sharing in a browser and " \
           "save the file as checkpoints/sit_lvvit_ti.pth" in section  # Google Drive: --download cannot fetch it
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "sit_lvvit_ti.pth").write_bytes(b"")
    again = CliRunner().invoke(main, ["weights", "sit-2", "--weights", str(tmp_path / "w")]).output
    assert "checkpoints/sit_lvvit_ti.pth (2 recipes): ✓" in again
