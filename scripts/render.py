"""Render videos of a trained avatar: ``python scripts/render.py [run=RUN] [key=value ...]``.

    python scripts/render.py run=RUN 'source=[data.generator.seed=1]'   # retargeting + novel views
    python scripts/render.py reenact=data/other                          # ICT avatars: another subject's weights
    python scripts/render.py blendshapes=capture.csv novel_views=0       # ICT avatars: ARKit CSV weights

Options live in ``configs/render.yaml``; what each video is: :mod:`headkit.engine.videos`.
Writes ``retarget.mp4``, ``reenact.mp4``, ``blendshapes.mp4``, ``novel_views.mp4`` (rendering |
reference) into ``out`` (default ``RUN/renders``).
"""

import hydra
from omegaconf import DictConfig

from headkit.cli import user_errors_exit
from headkit.engine.videos import render_videos


@hydra.main(version_base="1.3", config_path="../configs", config_name="render")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: render the asked-for videos and print where they went."""
    with user_errors_exit():
        written = render_videos(cfg)
    for name, video in written.items():
        print(f"{name}: {video['frames']} frames -> {video['path']}")


if __name__ == "__main__":
    main()
