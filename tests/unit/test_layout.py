"""The rooms and the way imports point between them (README, Layout).

``qlora_ray.errors`` <- ``data`` <- ``qlora_ray`` (the shared library) <- the stages (``jobs`` train, preflight,
export, evaluate, artifacts; ``tune``; ``serve``) <- the composition roots (``jobs.pipeline``, ``jobs.cli``).
Imports inside functions count: a hidden import is still an import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("data", "qlora_ray", "jobs", "tune", "serve")
ROOTS = {"jobs.pipeline", "jobs.cli"}


def modules() -> dict[str, set[str]]:
    """Every module of ours and the project modules it imports (at the top or inside functions)."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            imported: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    imported |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imported.add(node.module)
                    imported |= {f"{node.module}.{alias.name}" for alias in node.names}
            found[name] = {m for m in imported if m.split(".")[0] in PACKAGES}
    return found


def room(module: str) -> str:
    """Which room a module is in, for the rules below."""
    if module in ROOTS:
        return "root"
    if module == "qlora_ray.errors":
        return "errors"
    return module.split(".")[0]


# What each room may import from the project's own rooms.
ALLOWED = {
    "errors": set(),
    "data": {"data", "errors"},
    "qlora_ray": {"data", "errors", "qlora_ray"},
    "jobs": {"data", "errors", "qlora_ray", "jobs"},
    "tune": {"data", "errors", "qlora_ray", "jobs", "tune"},
    "serve": {"data", "errors", "qlora_ray", "serve"},
    "root": {"data", "errors", "qlora_ray", "jobs", "tune", "serve", "root"},
}


def test_imports_point_one_way():
    wrong = []
    known = modules()
    for module, imported in known.items():
        for target in imported:
            target_module = target if target in known else target.rsplit(".", 1)[0]
            if room(target_module) not in ALLOWED[room(module)]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_the_rules_catch_a_wrong_import():
    # The checker itself: a stage reaching the pipeline, serve reaching training, tune reaching serve.
    assert room("jobs.pipeline") not in ALLOWED[room("jobs.train")]
    assert room("jobs.train") not in ALLOWED[room("serve.app")]
    assert room("serve.app") not in ALLOWED[room("tune.sweep")]
    assert room("tune.sweep") not in ALLOWED[room("serve.generator")]
    assert room("qlora_ray.config") not in ALLOWED[room("data.formats")]


def test_every_module_is_in_a_room_and_the_roots_exist():
    known = modules()
    assert set(known) >= ROOTS
    assert {room(m) for m in known} <= set(ALLOWED)


def test_serve_loads_no_training_code():
    """The Serve CLI and app, imported in a fresh interpreter, pull in neither our training code nor Ray Train/Tune."""
    probe = (
        "import sys, serve.__main__, serve.app, serve.generator\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jobs', 'tune') or m.startswith(('ray.train', "
        "'ray.tune', 'bitsandbytes.optim')))\n"
        "print('\\n'.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "", f"Serve imported training modules:\n{out}"


@pytest.mark.parametrize("package", PACKAGES)
def test_each_room_says_what_lives_there_and_what_it_may_import(package):
    doc = ast.get_docstring(ast.parse((REPO / package / "__init__.py").read_text())) or ""
    assert "import" in doc and len(doc) > 80, f"{package}/__init__.py needs a docstring naming its contents and imports"
    assert "issue" not in doc.lower()
