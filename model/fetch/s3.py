"""s3://bucket/key through boto3, against AWS or any S3-compatible store (MinIO, Ceph, R2, GCS's XML API).

Credentials are boto3's own chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, a profile,
IRSA's web identity, an instance role); the endpoint is NANOGPT_S3_ENDPOINT, else boto3's AWS_ENDPOINT_URL_S3
/ AWS_ENDPOINT_URL. botocore's own retries are off: transfer.retrying owns them, as for HTTP.
A key ending in "/" is a directory: every object under that prefix, named relative to it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Iterator

from .config import FetchSettings
from .errors import AccessDenied, FetchError, NotFound, Stalled, Unreachable
from .transfer import Listing, RemoteFile, retrying
from .uri import S3Source

NOT_FOUND = ("NoSuchKey", "NoSuchBucket", "404", "NotFound")
DENIED = ("AccessDenied", "403", "401", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
          "InvalidToken", "AllAccessDisabled", "AccountProblem")
MAX_OBJECTS = 10_000  # a directory source larger than this is surely not one checkpoint


def resolve_s3(source: S3Source, settings: FetchSettings) -> Listing:
    client = _client(settings)
    if source.is_dir:
        keys = retrying(f"list {source.uri}", settings, lambda: _list(client, source))
        if not keys:
            raise NotFound(source.uri, "no objects under this prefix")
        files = [_probe(client, source, key, key[len(source.key):], settings) for key in keys]
        return Listing(files, True)
    name = source.key.rsplit("/", 1)[-1]
    return Listing([_probe(client, source, source.key, name, settings)], False)


def _client(settings: FetchSettings):
    try:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config
    except ImportError as err:
        raise FetchError("s3://", f"s3:// needs boto3 ({err}); pip install 'nanogpt-k8s[fetch]'") from None
    config = Config(connect_timeout=settings.connect_timeout_s, read_timeout=settings.read_timeout_s,
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    s3={"addressing_style": settings.s3_addressing},
                    **({"signature_version": UNSIGNED} if settings.s3_anonymous else {}))
    verify = {"verify": str(settings.ca_bundle)} if settings.ca_bundle else {}
    return boto3.session.Session().client("s3", endpoint_url=settings.s3_endpoint, region_name=settings.s3_region,
                                           config=config, **verify)


def _list(client, source: S3Source) -> list[str]:
    keys: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=source.bucket, Prefix=source.key):
            keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
            if len(keys) > MAX_OBJECTS:
                raise FetchError(source.uri, f"more than {MAX_OBJECTS} objects under this prefix")
    except Exception as err:
        raise _error(source.uri, err) from err
    return sorted(keys)


def _probe(client, source: S3Source, key: str, name: str, settings: FetchSettings) -> RemoteFile:
    uri = f"s3://{source.bucket}/{key}"

    def head() -> dict:
        try:
            return client.head_object(Bucket=source.bucket, Key=key, ChecksumMode="ENABLED")
        except Exception as err:
            raise _error(uri, err) from err

    meta = retrying(f"fetch {uri}", settings, head)
    etag = meta.get("ETag")
    return RemoteFile(uri=uri, name=name, size=meta.get("ContentLength"), version=etag, sha256=_sha256(meta),
                      open=lambda offset: _open(client, source.bucket, key, uri, offset, etag, settings))


def _sha256(meta: dict) -> str | None:
    """S3's full-object SHA-256, when the uploader asked for one (not a multipart's checksum of checksums)."""
    value = meta.get("ChecksumSHA256")
    if not value or "-" in value or meta.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    try:
        return base64.b64decode(value).hex()
    except ValueError:
        return None


@dataclass
class S3Body:
    stream: object
    uri: str
    start: int
    total: int | None
    chunk_bytes: int

    def chunks(self) -> Iterator[bytes]:
        try:
            yield from self.stream.iter_chunks(self.chunk_bytes)
        except Exception as err:
            raise _error(self.uri, err) from err

    def close(self) -> None:
        self.stream.close()


def _open(client, bucket: str, key: str, uri: str, offset: int, etag: str | None, settings: FetchSettings) -> S3Body:
    kwargs = {"Bucket": bucket, "Key": key}
    if offset:
        kwargs["Range"] = f"bytes={offset}-"
    if etag:
        kwargs["IfMatch"] = etag  # a new upload under the same key fails the attempt rather than mixing bytes
    try:
        r = client.get_object(**kwargs)
    except Exception as err:
        code = getattr(err, "response", {}).get("Error", {}).get("Code") if hasattr(err, "response") else None
        if offset and code == "InvalidRange":  # a partial as long as the object, or longer: start over
            return _open(client, bucket, key, uri, 0, etag, settings)
        raise _error(uri, err) from err
    start, total = 0, r.get("ContentLength")
    if r.get("ContentRange"):  # "bytes 100-199/200"
        span, _, whole = r["ContentRange"].removeprefix("bytes ").partition("/")
        start, total = int(span.split("-")[0]), int(whole) if whole.isdigit() else None
    return S3Body(r["Body"], uri, start, total, settings.chunk_bytes)


def _error(uri: str, err: Exception) -> FetchError:
    """botocore's exceptions -> ours; imported lazily, as boto3 itself is."""
    from botocore import exceptions as bx

    if isinstance(err, FetchError):
        return err
    if isinstance(err, bx.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        what = f"S3 answered {code or status}: {err.response.get('Error', {}).get('Message') or code}"
        if code in NOT_FOUND or status == 404:
            return NotFound(uri, what)
        if code in DENIED or status in (401, 403):
            return AccessDenied(uri, what)
        if code in ("PreconditionFailed", "412"):
            return Unreachable(uri, "the object changed during the download (its ETag); a new fetch starts over")
        if status is not None and (status >= 500 or status in (408, 429)) or code in ("SlowDown", "RequestTimeout"):
            return Unreachable(uri, what)
        return FetchError(uri, what)
    if isinstance(err, bx.NoCredentialsError):
        return AccessDenied(uri, "no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or a "
                                 "role), or set NANOGPT_S3_ANONYMOUS=1 for a public bucket")
    if isinstance(err, bx.ReadTimeoutError):
        return Stalled(uri, "stalled: no data within the read timeout (NANOGPT_FETCH_READ_TIMEOUT)")
    if isinstance(err, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError)):
        return Unreachable(uri, f"unreachable: {err}")
    if isinstance(err, (bx.ResponseStreamingError, bx.IncompleteReadError, bx.HTTPClientError)):
        return Unreachable(uri, f"the connection dropped: {err}")
    return FetchError(uri, f"{type(err).__name__}: {err}")

