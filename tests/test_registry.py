"""headkit.registry.choose: config values name registry entries; unknown ones name key and choices."""

import pytest
import torch

from headkit.registry import choose


def test_choose_returns_the_entry_and_names_key_and_choices_for_an_unknown_value():
    registry = {"mse": "squared", "l1": "absolute"}
    assert choose(registry, "l1", "model.warmup.loss") == "absolute"
    with pytest.raises(ValueError, match=r"model\.warmup\.loss='l2'; expected one of \['l1', 'mse'\]"):
        choose(registry, "l2", "model.warmup.loss")
    with pytest.raises(ValueError, match=r"model\.warmup\.loss=\['mse'\]"):  # unhashable YAML value
        choose(registry, ["mse"], "model.warmup.loss")


def test_lr_schedules_registry_values_and_unknown_name():
    from graphavatar.schedules import LR_SCHEDULES, LRSchedule
    assert sorted(LR_SCHEDULES) == ["constant", "cosine", "exponential"]
    assert LRSchedule("exponential", 0.01, 100)(50) == pytest.approx(0.1)
    assert LRSchedule("cosine", 0.1, 10)(10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"model\.optim\.schedule='linear'.*constant"):
        LRSchedule("linear", 0.1, 10)


def test_lr_schedule_state_loads_with_weights_only(tmp_path):
    """LambdaLR saves the schedule's __dict__ in checkpoints: it must hold plain values only."""
    from graphavatar.schedules import LRSchedule
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule("cosine", 0.1, 10))
    torch.save({"scheduler": sched.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["scheduler"]["lr_lambdas"][0] == {"kind": "cosine", "final_ratio": 0.1, "max_steps": 10, "rounds": 1}
