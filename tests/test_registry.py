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
