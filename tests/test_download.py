"""headkit.download: streamed, checksummed, atomic downloads (local file:// URLs only)."""

import hashlib

import pytest

from headkit.download import DownloadError, check_sha256, download_file, sha256_of

PAYLOAD = b"headkit download test\n" * 1000


@pytest.fixture
def source(tmp_path):
    """A local file to download and its file:// URL."""
    path = tmp_path / "src" / "payload.bin"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path, path.as_uri()


def test_download_checks_sha256_and_renames(source, tmp_path):
    _, url = source
    dest = tmp_path / "out" / "payload.bin"
    got = download_file(url, dest, sha256=hashlib.sha256(PAYLOAD).hexdigest(), desc="payload")
    assert got == dest and dest.read_bytes() == PAYLOAD
    assert not (dest.parent / ".payload.bin.part").exists()
    assert sha256_of(dest) == hashlib.sha256(PAYLOAD).hexdigest()


def test_wrong_checksum_deletes_partial_and_names_url(source, tmp_path):
    _, url = source
    dest = tmp_path / "out" / "payload.bin"
    with pytest.raises(DownloadError, match="wrong SHA-256") as info:
        download_file(url, dest, sha256="0" * 64)
    message = str(info.value)
    assert url in message and str(dest) in message and "0" * 64 in message
    assert hashlib.sha256(PAYLOAD).hexdigest() in message
    assert not dest.exists() and not (dest.parent / ".payload.bin.part").exists()


def test_offline_names_url_and_destination(tmp_path):
    url = (tmp_path / "missing.bin").as_uri()
    dest = tmp_path / "out" / "missing.bin"
    with pytest.raises(DownloadError) as info:
        download_file(url, dest)
    assert isinstance(info.value, OSError)
    assert url in str(info.value) and str(dest) in str(info.value) and "\n" not in str(info.value)
    assert not dest.exists() and not (dest.parent / ".missing.bin.part").exists()


def test_check_sha256_names_file_and_digests(source):
    path, _ = source
    check_sha256(path, hashlib.sha256(PAYLOAD).hexdigest().upper(), "payload")
    with pytest.raises(DownloadError) as info:
        check_sha256(path, "f" * 64, "the payload")
    message = str(info.value)
    assert str(path) in message and "the payload" in message and "f" * 64 in message
    assert hashlib.sha256(PAYLOAD).hexdigest() in message
