"""The project's public surface and packaging: import names, and no shadowed stdlib."""

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_stdlib_operator_is_not_shadowed_from_the_repo_root():
    # -S skips site, so nothing has imported `operator` before the repo root (cwd) is searched.
    out = subprocess.run(
        [sys.executable, "-S", "-c", "import operator; print(operator.__file__); print(operator.itemgetter(1)('ab'))"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert Path(out[0]).resolve().parent == STDLIB
    assert out[1] == "b"


def test_operator_folder_is_not_a_package():
    assert (REPO / "operator").is_dir()
    assert not (REPO / "operator" / "__init__.py").exists()


def test_import_names():
    import model
    import nanogpt_operator
    import server

    assert Path(nanogpt_operator.__file__).resolve().parent == REPO / "operator" / "nanogpt_operator"
    assert Path(model.__file__).resolve().parent == REPO / "model"
    assert Path(server.__file__).resolve().parent == REPO / "server"


def test_seed_python_api():
    from model import generate_text, load_model_from_checkpoint

    assert callable(load_model_from_checkpoint) and callable(generate_text)


# --- model/: imports that point one way -------------------------------------------

LIBRARY = {"model", "model.__main__", "model.gpt", "model.checkpoint", "model.safe_load", "model.export",
           "model.tokenizer", "model.sampling", "model.generate"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """The model.* modules a file imports, anywhere in it (functions and TYPE_CHECKING blocks
    included): `from pkg import name` counts as pkg.name where that is a module."""
    import ast

    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def model_import_graph() -> dict[str, set[str]]:
    files = sorted((REPO / "model").rglob("*.py"))
    known = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, known) for f in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in the graph, as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_model_imports_have_no_circle():
    graph = model_import_graph()
    assert {"model.engine", "model.engine.scheduler", "model.engine.runner", "model.kernels.cpu"} <= graph.keys()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_library_never_imports_the_engine_and_the_kernels_only_the_model():
    """model/'s library (GPT, checkpoints, tokenizers, sampling, generate) never reaches into
    the serving engine; the kernels import nothing of model/ but the model's classes (gpt's, and
    quant's int8 layers, which the CPU kernel's int8 path swaps in)."""
    graph = model_import_graph()
    for module in LIBRARY:
        assert not {m for m in graph[module] if m.startswith("model.engine")}, module
    for module in (m for m in graph if m.startswith("model.kernels")):
        outside = {m for m in graph[module] if not m.startswith("model.kernels")}
        assert outside <= {"model.gpt", "model.quant"}, (module, graph[module])


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_engine_keeps_its_public_names():
    import model.engine as engine

    for name in ("Engine", "EngineConfig", "EngineError", "EngineStats", "EngineStopped", "GenerationResult",
                 "Overloaded", "PromptTooLong", "RequestHandle", "SamplingParams", "TokenChunk", "StepPlan"):
        assert name in engine.__all__ and hasattr(engine, name), name


# --- packaging: what each image installs covers what its code imports ------------------

OWN = {"model", "server", "nanogpt_operator", "__future__"}


def _module_level_imports(folder: Path) -> dict[str, set[str]]:
    """Third-party top-level names imported in a module's body (not lazily inside a function), with the
    files that import them: these are what a bare `import` of the package needs installed."""
    import ast

    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - OWN - set(sys.stdlib_module_names):
                where = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
                found.setdefault(top, set()).add(where)
    return found


def _extra(name: str) -> set[str]:
    """The distributions an extra of pyproject.toml names, its own `nanogpt-k8s[...]` extras followed."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    out: set[str] = set()
    for requirement in extras[name]:
        dist = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)
        if dist == "nanogpt-k8s":
            for inner in re.search(r"\[(.*)\]", requirement).group(1).split(","):
                out |= _extra(inner.strip())
        else:
            out.add(re.sub(r"[-_.]+", "-", dist).lower())
    return out


def _undeclared(folder: Path, extra: str) -> dict[str, set[str]]:
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    declared = _extra(extra)
    return {top: files for top, files in _module_level_imports(folder).items()
            if not {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(top, [top])} & declared}


def test_each_image_installs_what_its_code_imports():
    # The operator image installs the `operator` extra only (Dockerfile.operator): a module-level import it
    # lacks stops `kopf run` at start, as prometheus_client once did.
    assert _undeclared(REPO / "operator" / "nanogpt_operator", "operator") == {}
    assert _undeclared(REPO / "server", "server") == {}
    assert _undeclared(REPO / "model" / "fetch", "fetch") == {}
    # fetch/ and interop/ have extras of their own; triton_src.py is imported only once triton has
    # imported (model/kernels/triton_decode.py), which CUDA images get with torch.
    optional = ("model/fetch/", "model/interop/", "model/kernels/triton_src.py")
    model_rest = {top: files for top, files in _undeclared(REPO / "model", "model").items()
                  if any(not f.startswith(optional) for f in files)}
    assert model_rest == {}


def test_the_packaging_check_finds_an_undeclared_import(tmp_path: Path):
    (tmp_path / "m.py").write_text("import os\nimport kopf\nimport prometheus_client\ndef f():\n    import onnx\n")
    assert set(_module_level_imports(tmp_path)) == {"kopf", "prometheus_client"}
    assert "kopf" in _extra("operator") and "torch" in _extra("server")
