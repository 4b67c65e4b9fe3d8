"""The project's public surface and packaging: import names, and no shadowed stdlib."""

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
    the serving engine; the kernels import nothing of model/ but gpt's classes."""
    graph = model_import_graph()
    for module in LIBRARY:
        assert not {m for m in graph[module] if m.startswith("model.engine")}, module
    for module in (m for m in graph if m.startswith("model.kernels")):
        assert graph[module] <= {"model.gpt"}, (module, graph[module])


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_engine_keeps_its_public_names():
    import model.engine as engine

    for name in ("Engine", "EngineConfig", "EngineError", "EngineStats", "EngineStopped", "GenerationResult",
                 "Overloaded", "PromptTooLong", "RequestHandle", "SamplingParams", "TokenChunk", "StepPlan"):
        assert name in engine.__all__ and hasattr(engine, name), name
