"""The shape of the code, kept true: entry scripts are imported by nothing, the engine imports no domain module,
image code imports nothing of the text side, and the entry scripts stay thin."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENTRY_SCRIPTS = {"tdlm.train": ROOT / "tdlm" / "train.py", "tdlm.fsdit.train": ROOT / "tdlm" / "fsdit" / "train.py"}
# What the engine may use besides itself: the domain-free metric core (collectors, sinks, health rules, media).
DOMAIN_FREE = ("tdlm.engine", "tdlm.metrics.core", "tdlm.metrics.sinks", "tdlm.metrics.health", "tdlm.metrics.media",
               "tdlm.metrics.functional", "tdlm.metrics.common")
TEXT_SIDE = ("tdlm.metrics.text", "tdlm.metrics.text_health", "tdlm.tasks", "tdlm.objective", "tdlm.config",
             "tdlm.data", "tdlm.model", "tdlm.likelihood", "tdlm.sampling", "tdlm.diffusion")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module a file imports (relative imports resolved), including ``from X import Y`` as X and X.Y."""
    tree, name = ast.parse(path.read_text()), module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def python_files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in sorted((ROOT / d).rglob("*.py"))]


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_imports_are_resolved_against_real_modules():
    """The checker itself: it sees the engine's own imports and a relative import's target."""
    assert "tdlm.engine.config" in imports(ROOT / "tdlm" / "engine" / "loop.py")
    assert "tdlm.engine.checkpoint" in imports(ROOT / "tdlm" / "runs.py")  # written `from .engine.checkpoint ...`


def test_no_module_imports_an_entry_script():
    for path in python_files("tdlm", "eval", "tests", "data_prep"):
        bad = {m for m in imports(path) if within(m, tuple(ENTRY_SCRIPTS))}
        assert not bad, f"{path.relative_to(ROOT)} imports the entry script(s) {sorted(bad)}"


def test_the_engine_imports_no_domain_module():
    engine_files = python_files("tdlm/engine")
    assert len(engine_files) >= 8
    for path in engine_files + [ROOT / "tdlm" / "metrics" / f"{m}.py" for m in ("core", "sinks", "health", "common")]:
        packages = {"tdlm", "tdlm.metrics"}  # `from tdlm.metrics import functional` names the package too
        bad = {m for m in imports(path) if m.startswith("tdlm") and not within(m, DOMAIN_FREE) and m not in packages}
        assert not bad, f"{path.relative_to(ROOT)} imports domain modules {sorted(bad)}"


def test_image_code_imports_nothing_of_the_text_side():
    files = python_files("tdlm/fsdit", "tdlm/metrics/image") + [ROOT / "tdlm" / "metrics" / "image_health.py"]
    for path in files:
        bad = {m for m in imports(path) if within(m, TEXT_SIDE)}
        assert not bad, f"{path.relative_to(ROOT)} imports text modules {sorted(bad)}"


@pytest.mark.parametrize("name", sorted(ENTRY_SCRIPTS))
def test_entry_scripts_stay_thin(name):
    """config -> engine(task) -> fit -> close, and nothing else: at most ~40 lines and no definitions."""
    path = ENTRY_SCRIPTS[name]
    tree = ast.parse(path.read_text())
    assert len(path.read_text().splitlines()) <= 40
    assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
