"""The operator's layout: one sub-package per resource, shared pieces at the top, imports one way."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from operator_helpers import REPO

from nanogpt_operator import api

PACKAGE = REPO / "operator" / "nanogpt_operator"
SHARED = {"api", "client", "conditions", "config", "errors", "fields", "metrics", "timers"}


def imported(path: Path) -> set[str]:
    """The nanogpt_operator modules a file imports, as dotted names below the package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanogpt_operator"):
            base = node.module.removeprefix("nanogpt_operator").lstrip(".")
            names.update(f"{base}.{a.name}".lstrip(".") if base in ("", "model", "rollout") else base
                         for a in node.names)
    return names


def test_the_controllers_import_only_shared_modules_and_themselves():
    for resource, other in (("model", "rollout"), ("rollout", "model")):
        for path in (PACKAGE / resource).glob("*.py"):
            for name in imported(path):
                top = name.split(".")[0]
                assert top in SHARED | {resource}, f"{path.name} of {resource}/ imports {name}"
                assert top != other


def test_shared_modules_import_no_controller():
    for name in SHARED:
        assert not {n.split(".")[0] for n in imported(PACKAGE / f"{name}.py")} & {"model", "rollout"}, name


def test_the_api_group_is_defined_once():
    defining = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py")
                if any(isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id in ("GROUP", "VERSION")
                                                         for t in n.targets)
                       for n in ast.parse(p.read_text()).body)]
    assert defining == [Path("api.py")]
    assert (api.GROUP, api.VERSION) == ("nanogpt.dev", "v1alpha1")


def test_importing_the_package_registers_both_controllers():
    # In a fresh interpreter: KopfRunner in other tests replaces kopf's default registry in this one.
    code = ("import kopf, nanogpt_operator; r = kopf.get_default_registry(); "
            "print(sorted({h.selector.any_name for h in r._spawning.get_all_handlers()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    assert out.strip() == str(sorted([api.MODEL_PLURAL, api.ROLLOUT_PLURAL]))
