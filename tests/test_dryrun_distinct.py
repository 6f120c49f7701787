"""CI dry-runs one recipe per distinct configuration: hyper-parameters alone do not make one."""
import yaml

from reproduce.engine import dryrun


def test_recipes_that_differ_only_in_hyper_parameters_share_a_configuration(tmp_path):
    base = yaml.safe_load((dryrun.RECIPES / "riformer" / "base.yaml").read_text())
    variants = {"a": {}, "lr": {"optimizer": {"lr_base": 1e-4}}, "epochs": {"epochs": 7},
                "teacher": {"distill": {"type": "soft", "teacher": {"model": "resnet50"}}},
                "size": {"data": {"img_size": 384}}}
    paths = []
    for name, change in variants.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"base": str(dryrun.RECIPES / "riformer" / "base.yaml"), **change}))
        paths.append(path)
    assert base["model"]["name"]
    kept = [p.stem for p in dryrun.distinct(paths)]
    assert kept == ["a", "teacher", "size"]


def test_every_recipe_of_the_suite_is_represented_by_one_that_ci_runs():
    everything = dryrun.recipe_files()
    kept = dryrun.distinct(everything)
    assert 0 < len(kept) < len(everything)
    assert not any(p.parent.name == "figures" for p in everything)  # figure definitions are not recipes
