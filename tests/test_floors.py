"""The floors of DESIGN.md section 6: every import in ``neva/`` (module level and inside functions)
goes to the same floor or one below, and the data wing imports only the foundations and itself."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PKG = ROOT / "neva"
DATA = "data"
# first match wins: a folder entry (trailing /) holds every file below it
FLOORS = [
    ("neva/config.py", 0), ("neva/flops.py", 0), ("neva/params.py", 0), ("neva/comm.py", 0), ("neva/loss.py", 0), ("neva/batch.py", 0),
    ("neva/registry.py", 0), ("neva/overrides.py", 0), ("neva/progress.py", 0), ("neva/layers/", 0),
    ("neva/vision.py", 1), ("neva/dino.py", 1), ("neva/fused.py", 1), ("neva/projector.py", 1), ("neva/llm.py", 1),
    ("neva/data/", DATA),
    ("neva/model.py", 2), ("neva/__init__.py", 2),
    ("neva/generate.py", 3), ("neva/parallel/", 3), ("neva/hf/", 3),
    ("neva/train/", 4),
    ("neva/export.py", 5), ("neva/experiment.py", 5), ("neva/cli.py", 5), ("neva/testing/", 5),
    ("neva/serve/", 5), ("neva/planner.py", 5), ("neva/plan/", 5),
]


def floor_of(rel: str):
    for prefix, floor in FLOORS:
        if rel == prefix or (prefix.endswith("/") and rel.startswith(prefix)):
            return floor
    return None


def module_file(name: str) -> str | None:
    """neva.a.b -> neva/a/b.py or neva/a/b/__init__.py (None if it is not a module of ours)."""
    parts = name.split(".")
    for cand in (Path(*parts).with_suffix(".py"), Path(*parts, "__init__.py")):
        if (ROOT / cand).is_file():
            return cand.as_posix()
    return None


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, file imported) for every import of a neva module in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from neva import llm`` imports the module neva/llm.py; ``from neva.x import f`` imports neva/x
            names = [f"{node.module}.{a.name}" if module_file(f"{node.module}.{a.name}") else node.module
                     for a in node.names]
        else:
            continue
        out += [(node.lineno, f) for f in map(module_file, names) if f and f.startswith("neva/")]
    return out


FILES = sorted(p.relative_to(ROOT).as_posix() for p in PKG.rglob("*.py"))


def test_every_file_has_a_floor():
    missing = [f for f in FILES if floor_of(f) is None]
    assert not missing, f"add these files to FLOORS (and DESIGN.md section 6): {missing}"


@pytest.mark.parametrize("rel", FILES)
def test_imports_run_down_the_floors(rel):
    me = floor_of(rel)
    bad = []
    for line, target in imports(ROOT / rel):
        there = floor_of(target)
        if me == DATA:
            ok = there in (0, DATA)
        else:
            ok = there is not None and (1 if there == DATA else there) <= me
        if not ok:
            bad.append(f"{rel}:{line} imports {target} (floor {there}; this file is on floor {me})")
    assert not bad, "\n".join(bad)


def test_the_test_sees_imports_inside_functions(tmp_path):
    """The parser must catch a lazy import, or the floors could be broken inside a function."""
    p = tmp_path / "x.py"
    p.write_text("def f():\n    from neva.train import step\n    from neva import model\n")
    assert [t for _, t in imports(p)] == ["neva/train/step.py", "neva/model.py"]
