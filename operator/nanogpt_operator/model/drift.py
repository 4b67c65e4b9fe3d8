"""Drift: a pure diff of a desired child against its live state, as a JSON merge patch (RFC 7386).

The API server adds defaults to what we send (probe timeouts, protocols, a clusterIP...), so a live
object is never equal to the desired one. Like `kubectl apply`, the diff therefore only looks at the
fields we manage: the fields of `desired`, plus the fields of `last_applied` (what we sent last time, kept
in an annotation) so that a field dropped from the spec is removed (sent as null) rather than left behind.
Lists are compared whole, since a merge patch replaces lists whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from nanogpt_operator.fields import QUANTITY

Path = tuple[str, ...]
_MISSING = object()


def _quantity(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    text = str(value)
    if not QUANTITY.match(text):
        return None
    from kubernetes.utils.quantity import parse_quantity  # a pure function of the client library

    try:
        return parse_quantity(text)
    except (ValueError, InvalidOperation):
        return None


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have and type(want) is type(have):
        return True
    # The API server normalises quantities: a limit sent as 1 reads back as "1", 1000m as "1".
    if isinstance(want, str) or isinstance(have, str):
        left, right = _quantity(want), _quantity(have)
        return left is not None and left == right
    return False


def same(want: Any, have: Any, last: Any = None) -> bool:
    """Whether live `have` already satisfies `want` (extra live keys are server defaults, not drift)."""
    if isinstance(want, Mapping):
        if not isinstance(have, Mapping):
            return False
        last = last if isinstance(last, Mapping) else {}
        dropped = any(key not in want and key in have for key in last)
        return not dropped and all(same(v, have.get(k, _MISSING), last.get(k)) for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(have, list) or len(want) != len(have):
            return False
        lasts = last if isinstance(last, list) and len(last) == len(want) else [None] * len(want)
        return all(same(w, h, l) for w, h, l in zip(want, have, lasts))
    return _same_scalar(want, have)


def merge_patch(desired: Mapping[str, Any], live: Mapping[str, Any], last_applied: Mapping[str, Any] | None = None,
                keep: frozenset[Path] = frozenset(), _path: Path = ()) -> dict[str, Any]:
    """The smallest merge patch that makes `live` match `desired` on the fields we manage.

    `keep` lists paths that are set on create and then left to someone else (replicas under an HPA).
    """
    last = last_applied or {}
    patch: dict[str, Any] = {}
    for key, want in desired.items():
        path = (*_path, key)
        have = live.get(key, _MISSING)
        if path in keep and have is not _MISSING:
            continue
        sub_last = last.get(key)
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            sub = merge_patch(want, have, sub_last if isinstance(sub_last, Mapping) else {}, keep, path)
            if sub:
                patch[key] = sub
        elif not same(want, have, sub_last):
            patch[key] = want
    for key in last:
        if key not in desired and key in live and (*_path, key) not in keep:
            patch[key] = None  # we set it before; the spec no longer asks for it
    return patch


def changed_paths(patch: Mapping[str, Any], _prefix: str = "") -> list[str]:
    """Dotted paths of what a patch changes, for Events and logs (lists count as one field)."""
    paths: list[str] = []
    for key, value in patch.items():
        path = f"{_prefix}.{key}" if _prefix else key
        if isinstance(value, Mapping) and value:
            paths.extend(changed_paths(value, path))
        else:
            paths.append(path)
    return paths
