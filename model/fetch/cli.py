"""`python -m model fetch URI DEST [--sha256 HEX]`: the init container's command.

stdout carries only JSON lines, one object each: {"phase": "Fetching", ...} while bytes move (at most
every NANOGPT_FETCH_PROGRESS_INTERVAL seconds), then exactly one {"phase": "Fetched", ...} or
{"phase": "Failed", "reason": ..., "message": ..., "retryable": ...}. Logs go to stderr. --status-file
(e.g. /dev/termination-log) gets the final object too, where Kubernetes shows it in the pod's status.
The exit code is the error's (errors.py): 0 fetched, 2 invalid URI or setting, 3 not found,
4 forbidden, 5 unreachable or stalled, 6 verification failed, 7 storage, 1 anything else.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .config import FetchConfigError, FetchSettings
from .errors import FetchError
from .fetcher import fetch

log = logging.getLogger("model.fetch")
STATUS_LIMIT = 4096  # bytes: Kubernetes keeps at most this much of a termination message


def add_parser(sub) -> None:
    p = sub.add_parser("fetch", help="download a checkpoint (https://, s3://, hf://) to DEST, resumable and verified",
                       description=__doc__.split("\n")[0])
    p.add_argument("uri", help="https://..., s3://bucket/key, hf://org/repo[@revision][/path], or a local path")
    p.add_argument("dest", help="where the file (or the directory, for a directory source) appears when complete")
    p.add_argument("--sha256", help="the expected digest: verified, and with it a cached copy needs no network")
    p.add_argument("--status-file", type=Path, help="also write the final JSON status here "
                                                    "(/dev/termination-log in a pod)")
    p.add_argument("--cache-dir", type=Path, help="the cache (default NANOGPT_CACHE_DIR, else ~/.cache/nanogpt)")
    p.add_argument("--allow-http", action="store_true", default=None,
                   help="accept plain http:// (NANOGPT_FETCH_ALLOW_HTTP)")
    p.add_argument("--read-timeout", type=float, help="seconds without data before an attempt fails "
                                                      "(NANOGPT_FETCH_READ_TIMEOUT, default 30)")
    p.add_argument("--retries", type=int, help="attempts after the first (NANOGPT_FETCH_RETRIES, default 5)")
    p.set_defaults(func=cmd_fetch)


def cmd_fetch(args) -> int:
    try:
        settings = FetchSettings.from_env(cache_dir=args.cache_dir, allow_http=args.allow_http,
                                          read_timeout_s=args.read_timeout, retries=args.retries)
    except FetchConfigError as err:
        return _fail(args, {"phase": "Failed", "uri": args.uri, "reason": "InvalidSetting", "message": str(err),
                            "retryable": False}, 2)
    try:
        result = fetch(args.uri, args.dest, sha256=args.sha256, settings=settings,
                       emit=lambda status: _print(status.as_dict()))
    except FetchError as err:
        log.error("%s", err)
        return _fail(args, {"phase": "Failed", "uri": err.uri, "reason": err.reason, "message": str(err),
                            "retryable": err.retryable}, err.exit_code)
    status = result.status()
    _print(status)
    _write_status(args.status_file, status)
    return 0


def _fail(args, status: dict, code: int) -> int:
    _print(status)
    _write_status(args.status_file, status)
    return code


def _print(obj: dict) -> None:
    print(json.dumps(obj, separators=(",", ":")), flush=True)


def _write_status(path: Path | None, status: dict) -> None:
    """The final status, cut to what a termination message holds (the file list goes first)."""
    if path is None:
        return
    text = json.dumps(status, separators=(",", ":"))
    if len(text.encode()) > STATUS_LIMIT:
        text = json.dumps({**{k: v for k, v in status.items() if k != "files"},
                           "files_omitted": len(status.get("files", []))}, separators=(",", ":"))
    try:
        path.write_text(text[:STATUS_LIMIT])
    except OSError as err:
        log.warning("cannot write the status to %s: %s", path, err.strerror or err)

