"""headkit.registry.choose: config values name registry entries; unknown ones name key and choices."""

import pytest

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
