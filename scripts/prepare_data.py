"""Prepare a subject folder: ``python scripts/prepare_data.py source=synthetic out=DIR``."""

import hydra
from omegaconf import DictConfig

from headkit.cli import user_errors_exit
from headkit.data.prepare import USER_ERRORS, prepare_data


@hydra.main(version_base="1.3", config_path="../configs", config_name="prepare_data")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; prints the summary of the written folder."""
    with user_errors_exit(*USER_ERRORS):  # bad input, a missing model file or kit: one "error:" line
        summary = prepare_data(cfg)
    for key, value in summary.items():
        print(f"{key:>15}: {value}")


if __name__ == "__main__":
    main()
