"""Error classes shared by every layer (kept free of imports, so any module can raise them)."""


class InvalidConfigValue(ValueError):
    """An invalid config value; the message names the full key, e.g. ``trainer.batch_size`` or
    ``model.optim.lr.unets``. Scripts print it as one ``error:`` line (:mod:`headkit.cli`)."""
