"""Parts chosen by a config value: a registry is a plain dict ``name -> class or function``.

A new part is one new class (or function) and one registry entry; a config value names it, and
no ``if``-chain changes. :func:`choose` looks the value up and, for an unknown one, raises an
error that names the config key and the known names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from headkit.errors import InvalidConfigValue

__all__ = ["choose"]

T = TypeVar("T")


def choose(registry: Mapping[str, T], name: Any, key: str) -> T:
    """``registry[name]``; an :class:`~headkit.errors.InvalidConfigValue` naming ``key`` (``model.warmup.loss``) and the
    registry's names when ``name`` is not one of them."""
    try:
        return registry[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value (a list from the YAML)
        raise InvalidConfigValue(f"invalid config value {key}={name!r}; expected one of {sorted(registry)}") from None
