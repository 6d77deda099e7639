"""The pack as the Comfy Registry and ComfyUI-Manager see it: pyproject metadata, licence, icon, requirements,
example workflows with thumbnails, per-node help pages, node ids and categories as documented."""

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
WORKFLOWS = REPO / "example_workflows"
#: modules the ComfyUI host provides (never listed in requirements.txt)
HOST_MODULES = {"torch", "comfy", "comfy_api", "comfy_execution", "folder_paths", "latent_preview", "nodes", "server"}
#: import name -> distribution name on PyPI
DISTRIBUTIONS = {"PIL": "Pillow", "av": "av", "numpy": "numpy", "tqdm": "tqdm", "safetensors": "safetensors"}


def _documented_nodes() -> dict[str, tuple[str, str]]:
    """id -> (display name, category) from the node table of docs/nodes.md."""
    rows = re.findall(r"^\| \*\*(.+?)\*\* \| `(\w+)` \| ([\w/]+) \|", (REPO / "docs" / "nodes.md").read_text(), re.M)
    return {node_id: (name, category) for name, node_id, category in rows}


def test_project_metadata_follows_the_registry_rules():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    name = project["name"]
    assert re.fullmatch(r"[A-Za-z_][\w.-]{0,99}", name) and "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    from comfyui_std import __version__
    assert project["version"] == __version__
    assert project["description"] and project["requires-python"]
    for key in ("Repository", "Documentation"):
        assert project["urls"][key].startswith("https://"), key
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["DisplayName"]
    from packaging.specifiers import SpecifierSet
    spec = SpecifierSet(comfy["requires-comfyui"])
    assert "0.3.64" in spec and "0.3.40" not in spec  # the tested host is allowed; pre-V3 hosts are not


def test_licence_is_the_gpl_the_metadata_names():
    text = (REPO / "LICENSE").read_text()
    assert PYPROJECT["project"]["license"] == {"file": "LICENSE"}
    assert text.lstrip().startswith("GNU GENERAL PUBLIC LICENSE") and "Version 3, 29 June 2007" in text
    assert any("GPLv3+" in c for c in PYPROJECT["project"]["classifiers"])
    assert "GPL-3.0-or-later" in (REPO / "README.md").read_text()


def test_icon_is_a_square_image_in_the_repository():
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    repo_url = PYPROJECT["project"]["urls"]["Repository"]
    owner_repo = repo_url.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert icon.startswith(prefix), icon
    path = REPO / icon[len(prefix):]
    svg = path.read_text()
    w, h = (int(v) for v in re.search(r'viewBox="0 0 (\d+) (\d+)"', svg).groups())
    assert w == h <= 400 and "<script" not in svg


def _third_party_imports(paths) -> set[str]:
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in HOST_MODULES and m != "comfyui_std"}


def test_requirements_are_exactly_what_the_nodes_import():
    modules = _third_party_imports([REPO / "__init__.py", *sorted((REPO / "comfyui_std").rglob("*.py"))])
    assert modules <= set(DISTRIBUTIONS), f"map these imports to distributions: {modules - set(DISTRIBUTIONS)}"
    lines = [ln.split("#")[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    listed = {re.split(r"[<>=!~\[; ]", ln)[0] for ln in lines if ln}
    assert listed == {DISTRIBUTIONS[m] for m in modules}
    assert "torch" not in listed


def test_comfyignore_ships_the_nodes_and_their_assets_only():
    ignored = {ln.strip().rstrip("/") for ln in (REPO / ".comfyignore").read_text().splitlines() if ln.strip()}
    assert {"tests", "bench", "training", "std_app", "gradio_app.py"} <= ignored
    assert not ignored & {"comfyui_std", "web", "example_workflows", "LICENSE", "__init__.py", "requirements.txt"}


def test_no_exec_eval_or_statement_chains_in_the_pack():
    """The Registry's `comfy node validate` check: ruff rules S102 (exec), S307 (eval), E702 (a; b)."""
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "S102,S307,E702", "--no-cache",
                           "__init__.py", "comfyui_std", "tools"], cwd=REPO, capture_output=True, text=True)
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr


def test_every_example_workflow_has_a_thumbnail_and_an_api_twin():
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert names and names == sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json"))
    for name in names:
        ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
        assert ui["nodes"] and "links" in ui, name
        with Image.open(WORKFLOWS / f"{name}.jpg") as im:
            assert im.format == "JPEG" and 200 <= im.width <= 1024 and im.height >= 150, name
    assert not (REPO / "workflows").exists()  # one folder: ComfyUI would list a second one too


def test_nodes_ids_categories_and_help_pages_are_as_documented(host):
    documented = _documented_nodes()
    ours = {k: cls for k, cls in host.M.items() if ".comfyui_std.nodes." in cls.__module__}  # as ComfyUI loaded them
    schemas = {node_id: cls.GET_NODE_INFO_V1() for node_id, cls in ours.items()}
    assert set(schemas) == set(documented)
    for node_id, info in schemas.items():
        assert info["name"] == node_id and (info["display_name"], info["category"]) == documented[node_id], node_id
        page = (REPO / "web" / "docs" / f"{node_id}.md").read_text()
        assert page.startswith(f"# {info['display_name']}\n"), node_id
        inputs = [k for section in ("required", "optional") for k in info["input"].get(section, {})]
        for name in inputs + list(info["output_name"]):
            assert f"**{name}**" in page, f"{node_id}: help page does not describe {name}"
    assert {Path(p).resolve() for p in host.nodes.EXTENSION_WEB_DIRS.values()} >= {(REPO / "web").resolve()}


def test_the_front_door_names_every_node():
    """The README's short node table names every node of docs/nodes.md (bug: a new node documented only deep down)."""
    readme = (REPO / "README.md").read_text()
    missing = [name for name, _ in _documented_nodes().values() if name not in readme]
    assert not missing, missing


def test_template_browser_lists_the_example_workflows(host):
    """ComfyUI's own /workflow_templates route (app/custom_node_manager.py) over the pack installed in custom_nodes/."""
    import asyncio

    import folder_paths
    from aiohttp import web
    from app.custom_node_manager import CustomNodeManager

    folder_paths.add_model_folder_path("custom_nodes", str(host.pack.parent), is_default=True)
    routes, app = web.RouteTableDef(), web.Application()
    CustomNodeManager().add_routes(routes, app, [(host.pack.name, str(host.pack))])
    handler = next(r.handler for r in routes if getattr(r, "path", "") == "/workflow_templates")
    listed = json.loads(asyncio.run(handler(None)).text)
    assert sorted(listed[host.pack.name]) == sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    static = [r for r in app.router.resources() if getattr(r, "canonical", "").endswith(host.pack.name)]
    assert static, "the pack's example_workflows folder is not served"


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "example_workflows").glob("*.json")))
def test_the_workflows_page_lists_every_example_workflow(name):
    assert f"`{name}.json`" in (REPO / "docs" / "workflows.md").read_text()
