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
