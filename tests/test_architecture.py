"""The layering of the project, checked over its import graph (every import statement, module level or inside a
function, read with ``ast``; nothing is imported).

Layers, lowest first: ``comfyui_std.core`` (pure torch) <- ``comfyui_std.nodes`` and ``std_hf`` <- ``std_app`` and
``training`` <- ``gradio_app``, ``bench``, ``tools``. A module imports only from its own layer or lower ones, the
trainer skeleton (``training.common``) imports no method, nothing outside ``tests/`` imports from ``tests/``, and
there is no import circle between modules.
"""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("comfyui_std", "std_hf", "std_app", "training", "tools", "bench", "gradio_app")
#: what each part may import from the project (besides itself)
ALLOWED = {
    "comfyui_std.core": set(),
    "comfyui_std.nodes": {"comfyui_std.core"},
    "comfyui_std": {"comfyui_std.core", "comfyui_std.nodes"},  # the package's own __init__
    "std_hf": {"comfyui_std.core"},
    "std_app": {"comfyui_std.core", "std_hf"},
    "training": {"comfyui_std.core", "std_hf"},
    "gradio_app": {"comfyui_std.core", "std_hf", "std_app"},
    "bench": {"comfyui_std.core", "comfyui_std.nodes", "std_hf", "std_app", "training", "tools"},
    "tools": {"comfyui_std.core", "comfyui_std.nodes", "std_hf"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    out = {}
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ROOTS or rel.name == "gradio_app.py":
            out[_module_name(path)] = path
    return out


def _targets(module: str, node, is_package: bool, modules: dict) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".")[: None if is_package else -1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    found = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body)."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets.update(t for t in _targets(module, node, path.name == "__init__.py", modules)
                               if t != module and not module.startswith(t + "."))
        graph[module] = targets
    return graph


def part_of(module: str) -> str:
    for part in sorted(ALLOWED, key=len, reverse=True):
        if module == part or module.startswith(part + "."):
            return part
    raise AssertionError(f"{module} belongs to no layer")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_no_import_circle(graph):
    assert cycles(graph) == []


def test_no_import_from_a_higher_layer(graph):
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                   if part_of(t) != part_of(m) and part_of(t) not in ALLOWED[part_of(m)])
    assert wrong == []


def test_the_trainer_skeleton_imports_no_method(graph):
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith("training.common")
                   for t in targets if t.startswith(("training.std", "training.sid_lsg", "training.bank")))
    assert wrong == []


def test_nothing_outside_tests_imports_from_tests():
    tests = {p.stem for p in (REPO / "tests").glob("*.py")}
    wrong = []
    for module, path in project_modules().items():
        text = path.read_text()
        tree = ast.parse(text, str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            wrong += [f"{module} imports {n}" for n in names if n.split(".")[0] in tests or n.startswith("tests")]
        if re.search(r"""sys\.path\.(insert|append)\([^)\n]*["']tests["']""", text):
            wrong.append(f"{module} puts tests/ on sys.path")
    assert wrong == []


def test_the_checker_sees_a_circle_and_an_upward_import():
    """The checks above can fail: a made-up graph with a circle and a core module importing the app."""
    fake = {"comfyui_std.core.a": {"comfyui_std.core.b"}, "comfyui_std.core.b": {"comfyui_std.core.a", "std_app.x"},
            "std_app.x": set()}
    assert cycles(fake) == [["comfyui_std.core.a", "comfyui_std.core.b"]]
    assert part_of("std_app.x") not in ALLOWED[part_of("comfyui_std.core.b")]


#: files allowed to walk a folder tree themselves: the one walk, and folders the project itself writes (a checkpoint
#: or export being assembled, a checkpoint whose every file is checked for pickles) or the test host's snapshot of
#: a ComfyUI tree (proving the tests write nothing into it)
OWN_WALKS = {"comfyui_std/core/folders.py", "training/common/export.py", "training/common/state.py",
             "tools/comfy_host.py"}


def test_one_folder_walk():
    """A recursive walk over a user's folder lives once, in comfyui_std/core/folders.py (links resolved and kept
    inside, pipes skipped, loops cut, each with a notice). Bug caught: a second walk (the batch CLI had its own
    rglob) that follows a link out of the folder or blocks on a FIFO without a word."""
    walks = []
    for path in sorted(REPO.glob("**/*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(("tests/", "bench/", ".")) or rel in OWN_WALKS:
            continue
        text = path.read_text(encoding="utf-8")
        walks += [f"{rel}: {m.group(0)}" for m in re.finditer(r"os\.walk\(|\.rglob\(", text)]
    assert not walks, walks
