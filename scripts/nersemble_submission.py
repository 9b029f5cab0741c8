"""Write the NeRSemble Monocular FLAME Avatar submission zip:
``python scripts/nersemble_submission.py run=RUN [key=value ...]``.

    python scripts/nersemble_submission.py run=outputs/train/RUN                        # one participant
    python scripts/nersemble_submission.py 'run=[RUN_393,RUN_404,RUN_461,RUN_477,RUN_486]' out=submission.zip

Options live in ``configs/nersemble_submission.yaml``; the zip's layout and how frames are made:
:mod:`headkit.engine.nersemble_submission`. Upload the zip at
https://kaldir.vc.in.tum.de/nersemble_benchmark/ (benchmark "Monocular FLAME Avatar").
"""

import hydra
from omegaconf import DictConfig

from headkit.cli import user_errors_exit
from headkit.data.nersemble import PARTICIPANTS
from headkit.engine.nersemble_submission import write_submission


@hydra.main(version_base="1.3", config_path="../configs", config_name="nersemble_submission")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: write the zip, print its entries and any layout problem found."""
    with user_errors_exit():
        result = write_submission(cfg)
    for entry, frames in result["entries"].items():
        print(f"{entry}: {frames} frames")
    for kind, items in result["issues"].items():
        print(f"warning: {kind}: {items}")
    participants = sorted({int(entry.split("/")[0]) for entry in result["entries"]})
    if participants != list(PARTICIPANTS):
        print(f"note: the zip holds participant(s) {participants}; the benchmark server expects all of "
              f"{list(PARTICIPANTS)} in one zip (pass one run per participant: 'run=[...]')")
    print(f"submission written to {result['zip']}")


if __name__ == "__main__":
    main()
