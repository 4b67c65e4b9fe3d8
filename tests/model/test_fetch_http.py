"""model.fetch over HTTP against a real file server on loopback (fetch_helpers.FileServer)."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest

from model.fetch import (AccessDenied, FetchSettings, InvalidSource, NotFound, Stalled, Unreachable,
                         VerificationFailed, fetch)

from fetch_helpers import Fault, FileServer

DATA = bytes(range(256)) * 4096  # 1 MiB, every byte position distinguishable
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def settings(tmp_path) -> FetchSettings:
    """Fast retries and a short read timeout: every wait in these tests is bounded by a setting."""
    return FetchSettings(cache_dir=tmp_path / "cache", allow_http=True, read_timeout_s=1.0, connect_timeout_s=2,
                         retries=2, backoff_s=0.0, backoff_max_s=0.0, progress_interval_s=0.0, chunk_bytes=1 << 16)


@pytest.fixture
def server():
    with FileServer({"out/ckpt.pt": DATA}) as s:
        yield s


def _leftovers(root) -> list[str]:
    """Files that look like a checkpoint but are not verified: anything outside blobs/refs/locks."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.parts[len(root.parts)] not in ("blobs", "refs", "locks", "manifests"))


def test_fetch_writes_the_file_and_reports_it(server, settings, tmp_path):
    dest = tmp_path / "models" / "ckpt.pt"
    result = fetch(server.url("out/ckpt.pt"), dest, sha256=SHA, settings=settings)
    assert dest.read_bytes() == DATA
    status = result.status()
    assert status["phase"] == "Fetched" and status["sha256"] == SHA and status["path"] == str(dest)
    assert status["bytes"] == status["downloaded_bytes"] == len(DATA) and status["cached"] is False
    assert result.name == "out"  # ckpt.pt says nothing; its folder names the model
    assert _leftovers(settings.cache_dir) == []


def test_second_fetch_uses_the_cache_one_head_no_get(server, settings, tmp_path):
    fetch(server.url("out/ckpt.pt"), tmp_path / "a.pt", settings=settings)
    assert len(server.gets("out/ckpt.pt")) == 1
    second = fetch(server.url("out/ckpt.pt"), tmp_path / "b.pt", settings=settings)
    assert second.cached and second.status()["downloaded_bytes"] == 0
    assert len(server.gets("out/ckpt.pt")) == 1  # the ETag matched: nothing downloaded again
    assert (tmp_path / "b.pt").read_bytes() == DATA
    assert os.path.samefile(tmp_path / "a.pt", tmp_path / "b.pt")  # one copy on disk, hard-linked


def test_a_pinned_digest_in_the_cache_needs_no_request_at_all(server, settings, tmp_path):
    fetch(server.url("out/ckpt.pt"), tmp_path / "a.pt", sha256=SHA, settings=settings)
    n = len(server.requests)
    server.files["other/name.pt"] = DATA  # a second model, same checkpoint, another URL
    again = fetch(server.url("other/name.pt"), tmp_path / "b.pt", sha256=SHA, settings=settings)
    assert again.cached and len(server.requests) == n


def test_a_dropped_connection_resumes_from_where_it_stopped(server, settings, tmp_path):
    server.faults["out/ckpt.pt"].append(Fault("drop", after=300_000))
    result = fetch(server.url("out/ckpt.pt"), tmp_path / "ckpt.pt", sha256=SHA, settings=settings)
    assert (tmp_path / "ckpt.pt").read_bytes() == DATA
    first, second = server.gets("out/ckpt.pt")
    assert "Range" not in first.headers
    resumed_at = int(second.headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 300_000 and second.headers["If-Range"] == server.etag("out/ckpt.pt")
    assert result.status()["downloaded_bytes"] == len(DATA)  # nothing received twice


def test_a_partial_left_by_a_killed_fetch_is_resumed_by_the_next(server, settings, tmp_path):
    server.faults["out/ckpt.pt"] += [Fault("drop", after=400_000)] * 3
    with pytest.raises(Unreachable):
        fetch(server.url("out/ckpt.pt"), tmp_path / "ckpt.pt", settings=settings.replace(retries=0))
    assert not (tmp_path / "ckpt.pt").exists()  # nothing that looks whole
    [partial] = (settings.cache_dir / "partial").iterdir()
    kept = partial.stat().st_size
    assert 0 < kept <= 400_000
    server.faults["out/ckpt.pt"].clear()
    result = fetch(server.url("out/ckpt.pt"), tmp_path / "ckpt.pt", sha256=SHA, settings=settings)
    assert (tmp_path / "ckpt.pt").read_bytes() == DATA
    assert server.gets("out/ckpt.pt")[-1].headers["Range"] == f"bytes={kept}-"
    assert result.status()["downloaded_bytes"] == len(DATA) - kept
    assert not partial.exists()


def test_a_stall_times_out_with_a_clear_error_after_the_retries(server, settings, tmp_path):
    # The count of failures starts again after an attempt that moved bytes; these resumes bring none.
    server.faults["out/ckpt.pt"] += [Fault("stall", after=100_000), Fault("stall"), Fault("stall")]
    with pytest.raises(Stalled) as err:
        fetch(server.url("out/ckpt.pt"), tmp_path / "ckpt.pt", settings=settings)
    assert err.value.uri == server.url("out/ckpt.pt")
    assert "stalled: no data for 1 s" in str(err.value) and "gave up after 2 retries" in str(err.value)
    assert err.value.exit_code == 5 and err.value.retryable
    assert len(server.gets("out/ckpt.pt")) == 3  # the first try and two retries, each resuming
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_stall_then_recovery_completes(server, settings, tmp_path):
    server.faults["out/ckpt.pt"].append(Fault("stall", after=100_000))
    fetch(server.url("out/ckpt.pt"), tmp_path / "ckpt.pt", sha256=SHA, settings=settings)
    assert (tmp_path / "ckpt.pt").read_bytes() == DATA


def test_wrong_bytes_are_refused_and_removed(server, settings, tmp_path):
    server.faults["out/ckpt.pt"].append(Fault("corrupt"))
    with pytest.raises(VerificationFailed) as err:
        fetch(server.url("out/ckpt.pt"), tmp_path / "ckpt.pt", sha256=SHA, settings=settings)
    assert f"--sha256 says {SHA}" in str(err.value) and "removed" in str(err.value)
    assert err.value.exit_code == 6
    assert not (tmp_path / "ckpt.pt").exists()
    assert _leftovers(settings.cache_dir) == [] and not (settings.cache_dir / "blobs").exists()


def test_a_changed_file_is_fetched_again(server, settings, tmp_path):
    fetch(server.url("out/ckpt.pt"), tmp_path / "ckpt.pt", settings=settings)
    server.files["out/ckpt.pt"] = DATA[::-1]  # a new upload: a new ETag
    result = fetch(server.url("out/ckpt.pt"), tmp_path / "ckpt.pt", settings=settings)
    assert not result.cached and (tmp_path / "ckpt.pt").read_bytes() == DATA[::-1]


@pytest.mark.parametrize("status, error, words", [
    (404, NotFound, "404"), (403, AccessDenied, "403"), (401, AccessDenied, "401")])
def test_http_errors_name_the_uri_and_the_cause(server, settings, tmp_path, status, error, words):
    server.faults["out/ckpt.pt"].append(Fault("status", status=status))
    server.head_allowed = False  # HEAD refused: the probe is a one-byte GET, which gets the fault
    with pytest.raises(error) as err:
        fetch(server.url("out/ckpt.pt"), tmp_path / "ckpt.pt", settings=settings)
    assert str(err.value).startswith(server.url("out/ckpt.pt") + ": the server answered " + words)
    assert not (tmp_path / "ckpt.pt").exists()


def test_missing_file_is_not_found(server, settings, tmp_path):
    with pytest.raises(NotFound, match="404"):
        fetch(server.url("nope.pt"), tmp_path / "ckpt.pt", settings=settings)


def test_a_server_that_refuses_head_still_works(server, settings, tmp_path):
    server.head_allowed = False  # as S3 pre-signed GET URLs do
    fetch(server.url("out/ckpt.pt"), tmp_path / "ckpt.pt", sha256=SHA, settings=settings)
    assert (tmp_path / "ckpt.pt").read_bytes() == DATA


def test_5xx_is_retried_then_succeeds(server, settings, tmp_path):
    server.faults["out/ckpt.pt"] += [Fault("status", status=503), Fault("status", status=502)]
    fetch(server.url("out/ckpt.pt"), tmp_path / "ckpt.pt", sha256=SHA, settings=settings)
    assert len(server.gets("out/ckpt.pt")) == 3


def test_an_unreachable_host_names_the_uri(settings, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/ckpt.pt"
    with pytest.raises(Unreachable) as err:
        fetch(url, tmp_path / "ckpt.pt", settings=settings.replace(retries=1))
    assert str(err.value).startswith(f"{url}: unreachable:") and "refused" in str(err.value).lower()
    assert "gave up after 1 retries" in str(err.value)


def test_a_503_on_the_probe_is_retried(server, settings, tmp_path):
    server.head_allowed = False  # the probe is then a GET, which the fault answers
    server.faults["out/ckpt.pt"].append(Fault("status", status=503))
    fetch(server.url("out/ckpt.pt"), tmp_path / "ckpt.pt", sha256=SHA, settings=settings)
    assert (tmp_path / "ckpt.pt").read_bytes() == DATA


def test_plain_http_needs_to_be_allowed(server, settings, tmp_path):
    with pytest.raises(InvalidSource, match="NANOGPT_FETCH_ALLOW_HTTP"):
        fetch(server.url("out/ckpt.pt"), tmp_path / "ckpt.pt", settings=settings.replace(allow_http=False))
    assert server.requests == []


def test_progress_is_logged_with_bytes_rate_and_eta(server, settings, tmp_path, caplog):
    seen = []
    with caplog.at_level(logging.INFO, logger="model.fetch"):
        fetch(server.url("out/ckpt.pt"), tmp_path / "ckpt.pt", settings=settings, emit=seen.append)
    lines = [r.getMessage() for r in caplog.records if "%)" in r.getMessage()]
    assert any("of 1.0 MiB" in line and "/s" in line and "ETA" in line for line in lines)
    assert seen[-1].done == len(DATA) and seen[-1].total == len(DATA)
    json.dumps(seen[-1].as_dict())


def test_a_file_larger_than_the_limit_is_refused_before_download(server, settings, tmp_path):
    from model.fetch import StorageError

    with pytest.raises(StorageError, match="NANOGPT_FETCH_MAX_BYTES"):
        fetch(server.url("out/ckpt.pt"), tmp_path / "ckpt.pt", settings=settings.replace(max_bytes=1000))
    assert not (tmp_path / "ckpt.pt").exists() and _leftovers(settings.cache_dir) == []


def test_https_with_a_private_ca_and_an_untrusted_certificate(settings, tmp_path):
    """https:// as it is served: trusted through NANOGPT_FETCH_CA_BUNDLE; without it, a TLSError at once."""
    import ssl

    trustme = pytest.importorskip("trustme")
    from model.fetch import TLSError

    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    with FileServer({"out/ckpt.pt": DATA}, ssl_context=ctx) as server:
        url = server.url("out/ckpt.pt")
        assert url.startswith("https://localhost:")
        https = settings.replace(allow_http=False, ca_bundle=tmp_path / "ca.pem")
        fetch(url, tmp_path / "ckpt.pt", sha256=SHA, settings=https)
        assert (tmp_path / "ckpt.pt").read_bytes() == DATA
        with pytest.raises(TLSError) as err:
            fetch(url, tmp_path / "other.pt", settings=https.replace(ca_bundle=None, cache_dir=tmp_path / "c2"))
        assert err.value.exit_code == 5 and not err.value.retryable and "CERTIFICATE_VERIFY_FAILED" in str(err.value)
        assert "retry" not in str(err.value)


def test_an_unreachable_source_falls_back_to_what_it_gave_last(settings, tmp_path):
    with FileServer({"out/ckpt.pt": DATA}) as server:
        url = server.url("out/ckpt.pt")
        fetch(url, tmp_path / "a.pt", settings=settings)
    # the server is gone now: a restarted pod still gets the copy, and says why
    result = fetch(url, tmp_path / "b.pt", settings=settings.replace(retries=0))
    assert result.cached and result.sha256 == SHA and (tmp_path / "b.pt").read_bytes() == DATA
    assert result.status()["provenance"] == {"offline_fallback": "Unreachable"}
    with pytest.raises(Unreachable):
        fetch(url, tmp_path / "c.pt", settings=settings.replace(retries=0, offline_fallback=False))
