"""Where a checkpoint comes from: the one grammar every entry point accepts (MODEL_CHECKPOINT,
load_model_from_checkpoint, `python -m model ...`).

    /path/ckpt.pt, ./dir, file:///path    a local file or directory, as before
    https://host/path/ckpt.pt             any HTTPS server; http:// only with allow_http
    s3://bucket/key                       any S3-compatible store (a key ending in / is a directory)
    hf://org/repo[@revision][/path]       the Hugging Face Hub: the repo root or a folder in it is a GPT-2
                                          directory (config.json + weights), a file path is one checkpoint
    pvc://claim/path                      only in a NanoGPTModel's spec: the operator mounts the claim

Pure string handling: nothing here touches the network or imports torch, boto3 or huggingface_hub.
The patterns are also what a CRD may validate `spec.checkpoint.uri` with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from .errors import InvalidSource

SCHEMES = ("https", "http", "s3", "hf", "file")
# Operator-side admission may use these (CRD `pattern`s); they accept exactly what parse_source does.
S3_BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
HF_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HF_URI = rf"hf://{HF_NAME}/{HF_NAME}(?:@[^/\s]+)?(?:/[^\s]*)?"
S3_URI = rf"s3://{S3_BUCKET}/\S+"
HTTPS_URI = r"https?://[^\s/@]+(?::\d+)?/\S*"
GENERIC_STEMS = ("ckpt", "model", "checkpoint", "pytorch_model", "config")


@dataclass(frozen=True)
class LocalSource:
    path: Path

    @property
    def uri(self) -> str:
        return str(self.path)

    @property
    def display(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class HttpSource:
    url: str

    @property
    def uri(self) -> str:
        return self.url

    @property
    def display(self) -> str:
        """The URL without its query: a pre-signed URL's signature is a credential, never logged."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?…" if parts.query else "")

    @property
    def name(self) -> str:
        return _name_of(PurePosixPath(unquote(urlsplit(self.url).path)).parts[1:], urlsplit(self.url).hostname or "")


@dataclass(frozen=True)
class S3Source:
    bucket: str
    key: str  # ends with "/" for a directory (a prefix)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    display = uri

    @property
    def is_dir(self) -> bool:
        return self.key.endswith("/")

    @property
    def name(self) -> str:
        return _name_of(PurePosixPath(self.key).parts, self.bucket)


@dataclass(frozen=True)
class HfSource:
    repo_id: str  # org/repo
    revision: str | None  # None: the repo's default branch
    path: str  # "" for the repo root; a folder or a file in the repo

    @property
    def uri(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo_id}{rev}" + (f"/{self.path}" if self.path else "")

    display = uri

    @property
    def name(self) -> str:
        return _name_of(PurePosixPath(self.path).parts, self.repo_id.split("/")[1])


Source = LocalSource | HttpSource | S3Source | HfSource
RemoteSource = HttpSource | S3Source | HfSource


def is_uri(text: str | Path) -> bool:
    """Whether `text` names a remote source (and so needs fetching) rather than a local path."""
    return isinstance(text, str) and bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text)) \
        and not text.lower().startswith("file://")


def parse_source(text: str | Path, allow_http: bool = False) -> Source:
    """A local path or a URI -> its Source; raises InvalidSource naming the rule broken."""
    if isinstance(text, Path):
        return LocalSource(text)
    text = str(text).strip()
    if not text:
        raise InvalidSource("''", "empty: expected a path or a https://, s3:// or hf:// URI")
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if not m:
        return LocalSource(Path(text))
    scheme = m.group(1).lower()
    if scheme == "file":
        return LocalSource(Path(unquote(urlsplit(text).path)))
    if scheme in ("https", "http"):
        return _parse_http(text, scheme, allow_http)
    if scheme == "s3":
        return _parse_s3(text)
    if scheme == "hf":
        return _parse_hf(text)
    if scheme == "pvc":
        raise InvalidSource(text, "pvc:// names a PersistentVolumeClaim in a NanoGPTModel's spec.checkpoint, "
                                  "which the operator mounts; inside a pod, name the mounted path")
    raise InvalidSource(text, f"unsupported scheme {scheme}://; expected https://, s3:// or hf:// "
                              "(or a local path)")


def _parse_http(text: str, scheme: str, allow_http: bool) -> HttpSource:
    parts = urlsplit(text)
    shown = HttpSource(text).display
    if scheme == "http" and not allow_http:
        raise InvalidSource(shown, "plain http:// is refused (the weights and any credentials would travel "
                                   "unencrypted); use https://, or allow it with NANOGPT_FETCH_ALLOW_HTTP=1 "
                                   "or --allow-http")
    if not parts.hostname:
        raise InvalidSource(shown, "no host in the URL")
    if parts.username or parts.password:
        raise InvalidSource(f"{scheme}://{parts.hostname}{parts.path}",
                            "credentials in the URL are refused (they would be logged); use a pre-signed URL")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as err:
        raise InvalidSource(shown, f"bad port: {err}") from None
    if parts.path in ("", "/"):
        raise InvalidSource(shown, "no file path in the URL")
    return HttpSource(text)


def _parse_s3(text: str) -> S3Source:
    rest = text[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not re.fullmatch(S3_BUCKET, bucket):
        raise InvalidSource(text, f"bucket {bucket!r} is not a valid S3 bucket name "
                                  "(3-63 of a-z, 0-9, '.', '-', starting and ending with a letter or digit)")
    if not key or key == "/":
        raise InvalidSource(text, "no key: expected s3://bucket/key (or s3://bucket/prefix/ for a directory)")
    return S3Source(bucket, key)


def _parse_hf(text: str) -> HfSource:
    rest = text[len("hf://"):]
    segments = rest.split("/")
    if segments[0] in ("datasets", "spaces"):
        raise InvalidSource(text, "only model repos are supported: hf://org/repo[@revision][/path]")
    if len(segments) < 2 or not segments[1]:
        raise InvalidSource(text, "expected hf://org/repo[@revision][/path]")
    org, repo_rev, path = segments[0], segments[1], "/".join(segments[2:]).strip("/")
    repo, _, revision = repo_rev.partition("@")
    for what, name in (("organization", org), ("repository", repo)):
        if not re.fullmatch(HF_NAME, name) or "--" in name or ".." in name:
            raise InvalidSource(text, f"{what} {name!r} is not a valid Hub name "
                                      "(letters, digits, '-', '_', '.'; at most 96)")
    if "@" in repo_rev and not revision:
        raise InvalidSource(text, "empty revision after '@'")
    if ".." in PurePosixPath(path).parts:
        raise InvalidSource(text, "'..' in the path")
    # fsspec's hf:// spelling: a revision with '/' (refs/pr/1) is written URL-encoded.
    return HfSource(f"{org}/{repo}", unquote(revision) or None, path)


def _name_of(parts: tuple[str, ...], fallback: str) -> str:
    """A short model name: the file's stem, or its folder's name when the stem says nothing
    (out-shakespeare-char/ckpt.pt -> out-shakespeare-char), as checkpoint._short_name does."""
    parts = tuple(p for p in parts if p and p != "/")
    for i in range(len(parts) - 1, -1, -1):
        stem = PurePosixPath(parts[i]).stem
        if stem not in GENERIC_STEMS:
            return stem
    return fallback
