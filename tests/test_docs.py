"""docs/: the generated reference matches the code; architecture.md names every module that exists."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_reference_is_current(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    from longalign_lib.docs_reference import render

    assert (ROOT / "docs" / "reference.md").read_text() == render(), \
        "docs/reference.md is stale: run `make docs` and commit it"


def test_architecture_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = sorted(p.stem for p in (ROOT / "longalign_lib").glob("*.py") if p.stem != "__init__")
    missing = [m for m in modules if f"{m}.py" not in text]
    assert not missing, f"docs/architecture.md does not describe: {missing}"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
