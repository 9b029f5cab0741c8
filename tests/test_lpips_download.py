"""LPIPS weights fetched once into the torch hub cache, as the lpips package does (issue 12).

Every download here comes from an ``http.server`` on 127.0.0.1 serving a tmp folder; the torch
hub dir is a tmp folder too. Nothing touches the internet, and nothing in the library downloads
unless asked (``download=True`` or ``eval.lpips_download``).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import socket
import threading
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from headkit import lpips_net, metrics
from headkit.lpips_net import (ALEXNET_FILENAME, ALEXNET_HASH_PREFIX, LIN_FILENAME, AlexNetFeatures,
                               clear_lpips_cache, lpips_available, prepare_lpips_weights)

ROOT = Path(__file__).resolve().parents[1]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args):  # no access log on stderr
        pass

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """``(base_url, folder, requests)``: a loopback HTTP server over ``tmp_path/served``."""
    folder = tmp_path / "served"
    folder.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_Quiet,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder, requests
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub dir; no weight env vars, downloads allowed, no cached networks."""
    hub_dir = tmp_path / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub_dir))
    for name in (lpips_net.ALEXNET_ENV, lpips_net.LIN_ENV, lpips_net.ALEXNET_URL_ENV, lpips_net.LIN_URL_ENV,
                 lpips_net.OFFLINE_ENV):
        monkeypatch.delenv(name, raising=False)
    clear_lpips_cache()
    yield hub_dir
    clear_lpips_cache()


@pytest.fixture
def fake_alexnet(server):
    """A torchvision-style AlexNet file (seeded random weights) served as ALEXNET_FILENAME;
    returns ``(url, sha256)``."""
    base, folder, _ = server
    torch.manual_seed(0)
    path = folder / ALEXNET_FILENAME
    torch.save(dict(AlexNetFeatures().state_dict()), path)
    return f"{base}/{ALEXNET_FILENAME}", hashlib.sha256(path.read_bytes()).hexdigest()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_hash_prefix_is_torch_hubs_check_of_the_file_name():
    assert re.search(torch.hub.HASH_REGEX, ALEXNET_FILENAME).group(1) == ALEXNET_HASH_PREFIX == "7be5be79"
    assert lpips_net.ALEXNET_URL == "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


def test_no_download_unless_asked(hub, fake_alexnet, server, monkeypatch):
    url, _ = fake_alexnet
    monkeypatch.setenv(lpips_net.ALEXNET_URL_ENV, url)
    ok, reason = lpips_available()
    assert not ok and str(hub / "checkpoints" / ALEXNET_FILENAME) in reason and "eval.lpips_download=true" in reason
    images = torch.rand(1, 32, 32, 3)
    result = metrics.compute_image_metrics(images, images * 0.5)
    assert result["lpips"] is None and "not found" in result["lpips_unavailable_reason"]
    assert server[2] == [] and not (hub / "checkpoints").exists()


def test_download_lands_in_the_hub_cache_once(hub, fake_alexnet, server, monkeypatch):
    url, digest = fake_alexnet
    monkeypatch.setenv(lpips_net.ALEXNET_URL_ENV, url)
    monkeypatch.setattr(lpips_net, "ALEXNET_HASH_PREFIX", digest[:8])  # the served file's own prefix
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    result = metrics.compute_image_metrics(images, images.flip(1), download=True)
    target = hub / "checkpoints" / ALEXNET_FILENAME
    assert target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == digest
    assert result["lpips"] is not None and result["lpips"] > 0 and "lpips_unavailable_reason" not in result
    assert [p for p in (hub / "checkpoints").iterdir() if p.name != ALEXNET_FILENAME] == []  # no .partial left
    clear_lpips_cache()
    assert lpips_available(download=True) == (True, "")
    assert server[2] == [f"/{ALEXNET_FILENAME}"]  # fetched once


def test_wrong_hash_is_refused_with_the_reason(hub, fake_alexnet, server, monkeypatch):
    url, digest = fake_alexnet
    monkeypatch.setenv(lpips_net.ALEXNET_URL_ENV, url)  # the real prefix 7be5be79: this file fails
    ok, reason = lpips_available(download=True)
    assert not ok and "refused" in reason and "7be5be79" in reason and digest in reason and url in reason
    assert not (hub / "checkpoints" / ALEXNET_FILENAME).exists()
    assert list((hub / "checkpoints").iterdir()) == []  # torch.hub removed its temporary file
    assert lpips_available(download=True) == (False, reason)
    assert len(server[2]) == 1  # a failed download is not retried in the same process


@pytest.mark.parametrize("where", ["closed port", "missing file"])
def test_unreachable_url_gives_unavailable_with_the_reason(hub, server, monkeypatch, where):
    url = (f"http://127.0.0.1:{_closed_port()}/{ALEXNET_FILENAME}" if where == "closed port"
           else f"{server[0]}/nothing/{ALEXNET_FILENAME}")
    monkeypatch.setenv(lpips_net.ALEXNET_URL_ENV, url)
    images = torch.rand(1, 32, 32, 3)
    result = metrics.compute_image_metrics(images, images * 0.5, download=True)
    reason = result["lpips_unavailable_reason"]
    assert result["lpips"] is None and "download failed" in reason and url in reason
    assert ("Connection refused" in reason or "URLError" in reason) if where == "closed port" else "404" in reason
    with pytest.raises(lpips_net.MetricUnavailable, match="download failed"):
        metrics.lpips(images, images, download=True)


def test_offline_never_downloads(hub, fake_alexnet, server, monkeypatch):
    url, digest = fake_alexnet
    monkeypatch.setenv(lpips_net.ALEXNET_URL_ENV, url)
    monkeypatch.setattr(lpips_net, "ALEXNET_HASH_PREFIX", digest[:8])
    monkeypatch.setenv(lpips_net.OFFLINE_ENV, "1")
    ok, reason = lpips_available(download=True)
    assert not ok and "HEADKIT_OFFLINE=1" in reason and url in reason
    assert server[2] == []


def test_explicit_paths_are_never_download_targets(hub, fake_alexnet, server, monkeypatch, tmp_path):
    url, digest = fake_alexnet
    monkeypatch.setenv(lpips_net.ALEXNET_URL_ENV, url)
    monkeypatch.setattr(lpips_net, "ALEXNET_HASH_PREFIX", digest[:8])
    missing = tmp_path / "mine" / "alexnet.pth"
    ok, reason = lpips_available(alexnet_path=missing, download=True)
    assert not ok and str(missing) in reason
    monkeypatch.setenv(lpips_net.ALEXNET_ENV, str(missing))
    assert not lpips_available(download=True)[0]
    assert server[2] == [] and not missing.exists()


def test_linear_layers_downloaded_without_the_lpips_package(hub, fake_alexnet, server, monkeypatch):
    url, digest = fake_alexnet
    base, folder, requests = server
    lin = folder / "alex.pth"
    torch.manual_seed(1)
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(lpips_net.ALEX_CHANNELS)},
               lin)
    monkeypatch.setattr(lpips_net, "_wheel_lin_path", lambda: None)  # as if lpips were not installed
    monkeypatch.setenv(lpips_net.ALEXNET_URL_ENV, url)
    monkeypatch.setattr(lpips_net, "ALEXNET_HASH_PREFIX", digest[:8])
    monkeypatch.setenv(lpips_net.LIN_URL_ENV, f"{base}/alex.pth")
    ok, reason = lpips_available()
    assert not ok and "lpips package is not installed" in reason
    monkeypatch.setattr(lpips_net, "LIN_SHA256", "0" * 64)  # full-hash check refuses
    assert "refused" in lpips_available(download=True)[1]
    clear_lpips_cache()
    monkeypatch.setattr(lpips_net, "LIN_SHA256", hashlib.sha256(lin.read_bytes()).hexdigest())
    assert lpips_available(download=True) == (True, "")
    assert lpips_net.default_lin_path() == hub / "checkpoints" / LIN_FILENAME
    net = lpips_net.load_lpips()
    torch.testing.assert_close(net.lins[0].weight, torch.load(lin)["lin0.model.1.weight"])
    assert requests == ["/alex.pth", "/alex.pth", f"/{ALEXNET_FILENAME}"]


def test_eval_config_downloads_for_the_scripts_evaluation(hub, fake_alexnet, server, monkeypatch, tiny_subject,
                                                          tmp_path):
    """configs/eval/default.yaml asks for the download; evaluate_run (scripts/eval.py) does it
    before the evaluation; a dict without the key (the tests' callers) never downloads."""
    from headkit.engine import runs

    url, digest = fake_alexnet
    monkeypatch.setenv(lpips_net.ALEXNET_URL_ENV, url)
    monkeypatch.setattr(lpips_net, "ALEXNET_HASH_PREFIX", digest[:8])
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        ecfg = compose("eval").eval
    assert ecfg.lpips_download is True and ecfg.lpips_weights is None
    assert prepare_lpips_weights({**ecfg, "lpips": False}) == (False, "disabled by eval.lpips=false")
    assert prepare_lpips_weights({**ecfg, "lpips_download": False})[0] is False and server[2] == []

    target = hub / "checkpoints" / ALEXNET_FILENAME
    seen = []

    class Model:
        def evaluate(self, dataset, out_dir, **kwargs):
            seen.append(target.is_file())
            return {"psnr": 1.0}

    def fake_load_run(run_dir, device):
        return runs.LoadedRun(OmegaConf.create({"experiment_name": "x"}), tiny_subject, Model(), "cpu",
                              Path(run_dir) / "checkpoints" / "x.pt", 3)

    monkeypatch.setattr(runs, "load_run", fake_load_run)
    runs.evaluate_run(tmp_path / "run", eval_cfg={"video": False}, name="plain")
    assert seen == [False] and server[2] == []  # no lpips_download key: no download
    runs.evaluate_run(tmp_path / "run", eval_cfg=ecfg, name="scripted")
    assert seen == [False, True] and server[2] == [f"/{ALEXNET_FILENAME}"]
