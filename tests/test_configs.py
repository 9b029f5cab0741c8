"""Every config group option composes; experiment files hold only overrides; typos are caught."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("data", "model", "trainer", "eval", "experiment", "ablation")
GLOBAL_GROUPS = ("experiment", "ablation")  # `# @package _global_` files: no node of their own


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg = _compose("train", [f"{group}={option}"])
    OmegaConf.resolve(cfg.trainer)
    assert cfg.model._target_ and cfg.data._target_
    if group not in GLOBAL_GROUPS:
        assert OmegaConf.select(cfg, group) is not None


@pytest.mark.parametrize("name", ["train", "eval", "prepare_data", "fit_3dgs"])
def test_top_level_configs_compose(name):
    cfg = _compose(name, [])
    assert cfg.task_name == name


@pytest.mark.parametrize("group,option", [(g, o) for g in GLOBAL_GROUPS for o in options(g)])
def test_experiment_files_are_global_packages(group, option):
    text = (CONFIGS / group / f"{option}.yaml").read_text()
    assert "# @package _global_" in text.splitlines()[0], f"{group}/{option}.yaml must start with '# @package _global_'"


def test_default_is_the_synthetic_subject_experiment_and_ablations_set_their_name():
    cfg = _compose("train", [])
    assert cfg.experiment_name == "synthetic_subject" and cfg.ablation_name is None
    cfg = _compose("train", ["ablation=no_ggo"])
    assert cfg.ablation_name == "no_ggo" and cfg.model.ggo.enabled is False


def test_typo_in_override_is_a_struct_error_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="trainer.max_stpes"):
        _compose("train", ["trainer.max_stpes=3"])


@pytest.mark.parametrize("name", ["train", "fit_3dgs"])  # eval/prepare_data write no Hydra folder
def test_hydra_run_folder_is_run_dir_when_given(name, tmp_path):
    import headkit.engine.rundir  # noqa: F401  registers ${hydra_run_dir:...}
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        dated = compose(name, overrides=[], return_hydra_config=True)
        assert f"/{name}/" in dated.hydra.run.dir and dated.hydra.run.dir[-19:-9].count("-") == 2
        if "run_dir" in dated:
            given = compose(name, overrides=[f"run_dir={tmp_path}"], return_hydra_config=True)
            assert given.hydra.run.dir == str(tmp_path)  # no second, near-empty dated folder
            (tmp_path / "config.yaml").write_text("seed: 0\n")  # tmp_path now holds a run ...
            taken = compose(name, overrides=[f"run_dir={tmp_path}"], return_hydra_config=True)
            assert taken.hydra.run.dir != str(tmp_path) and f"/{name}/" in taken.hydra.run.dir  # ... left alone
            resumed = compose(name, overrides=[f"run_dir={tmp_path}", "trainer.resume=true"],
                              return_hydra_config=True)
            assert resumed.hydra.run.dir == str(tmp_path)
