"""The data flows one way: sources -> records -> analysis -> report.

No stage imports a later one, nor a stage it does not read (analysis never reads sources, the
report never analyses)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "observer"

# For each stage, the observer subpackages it must never import.
FORBIDDEN = {
    "records": {"sources", "simulate", "analysis", "report", "commands"},
    "simulate": {"sources", "analysis", "report", "commands"},
    "sources": {"simulate", "analysis", "report", "commands"},
    "analysis": {"sources", "simulate", "report", "commands"},
    "report": {"sources", "simulate", "analysis", "commands", "catalog"},
}
# Modules beside the stages that every stage may use; they import no stage, only one another.
BASE = ["config.py", "catalog.py", "devices.py", "redaction.py", "text.py", "words.py",
        "yamlfile.py", "__init__.py"]


def imported_stages(path: Path) -> set[str]:
    stages = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "observer" and len(parts) > 1:
                stages.add(parts[1])
    return stages


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_no_stage_reaches_backwards(stage):
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(imported_stages(path) & FORBIDDEN[stage])
        for path in (PACKAGE / stage).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_base_modules_import_no_stage():
    for name in BASE:
        used = imported_stages(PACKAGE / name) - {base.removesuffix(".py") for base in BASE}
        assert used == set(), f"{name} imports {used}"
