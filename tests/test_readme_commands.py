"""Every command in the code blocks of the README, of ``docs/*.md`` and of ``training/README.md`` is run: here (in a
safe form), or by a test or CI step named in a map.

The commands are read from the pages' fenced ``bash``/``sh``/``console`` blocks (comments dropped, ``\\``
continuations joined, ``a && b`` split into ``a`` and ``b``). Each must be either

* in ``RUN_HERE``: a test in this file runs it, taking the command text from the README itself, or
* in ``RUN_ELSEWHERE``: the test or CI step that runs it, with a piece of that file's text as evidence, which is
  checked (so an entry cannot outlive the step it points at).

A command added to a page without an entry fails ``test_every_readme_command_is_run_somewhere``, naming the
command and this file. To add one: run it in a test here and list it in ``RUN_HERE``, or point ``RUN_ELSEWHERE`` at
the test or CI step that runs it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from gradio_client import Client

from app_server import REPO, free_port, start_cli, stop, wait_for_config

README = REPO / "README.md"
#: the pages whose shell blocks are commands a user runs
PAGES = (README, REPO / "training" / "README.md", *sorted((REPO / "docs").glob("*.md")))
SHELL_LANGS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*```\s*([\w-]*)\s*$")


def readme_commands(text: str) -> list[str]:
    """The commands of the README's shell code blocks, in order, whitespace-normalised."""
    commands, in_block, lang, pending = [], False, "", ""
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence:
            in_block, lang = (False, "") if in_block else (True, fence.group(1))
            continue
        if not in_block or lang not in SHELL_LANGS:
            continue
        line = re.sub(r"(^|\s)#(\s.*)?$", "", line.strip()).strip()  # a comment: "# ..." at the start or after a space
        line = f"{pending} {line}".strip() if pending else line
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        pending = ""
        commands += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    return commands


@dataclass(frozen=True)
class Evidence:
    """``path`` (relative to the repository) runs the command; ``text`` is in that file to show it."""

    path: str
    text: str

    def holds(self) -> bool:
        file = REPO / self.path
        return file.is_file() and self.text in file.read_text(encoding="utf-8")


CI = ".ci/run"
INSTALLS_DEV = Evidence(CI, "-r requirements-dev.txt")
DEV_HAS_APP = Evidence("requirements-dev.txt", "-r requirements-app.txt")
APP_HAS_NODES = Evidence("requirements-app.txt", "-r requirements.txt")
RUNS_PYTEST = Evidence(CI, "python -m pytest")
PINNED_COMFY = Evidence(CI, "MAIN_HOST=$SHARED/comfyui")
CLONE_IN_CUSTOM_NODES = Evidence("tools/comfy_host.py", 'custom = base / "custom_nodes"')
TRAIN_THEN_USE = Evidence("tests/test_train_then_use.py", "def test_the_first_run_loop_runs_as_written")
MODEL_COMMANDS = "test_the_model_commands_take_their_flags"

#: commands a test in this file runs (the value names that test)
RUN_HERE = {
    "python -m venv .venv": "test_the_fresh_venv_commands",
    ". .venv/bin/activate": "test_the_fresh_venv_commands",
    "python gradio_app.py --tiny": "test_the_tiny_app_command_serves_all_tabs",
    "python gradio_app.py --models-dir /path/to/ComfyUI/models --base sd_xl_base_1.0.safetensors": MODEL_COMMANDS,
    "python -m std_app.batch --models-dir /path/to/ComfyUI/models --base sd_xl_base_1.0.safetensors photos/ "
    "clips/trailer.mp4 --output stylized/ --prompt \"an oil painting, thick impasto\"": MODEL_COMMANDS,
    "python -m training.check_base --base ComfyUI/models/checkpoints/sd_xl_base_1.0.safetensors": MODEL_COMMANDS,
    "python -m training.std --preset sdxl-12gb --base ComfyUI/models/checkpoints/sd_xl_base_1.0.safetensors "
    "--style-lora my_style.safetensors --style-prompt \"watercolour painting\" --data photos/ --output "
    "runs/watercolour --start-strength 0.75": MODEL_COMMANDS,
    "python -m training.std --preset sdxl-12gb --base ComfyUI/models/checkpoints/sd_xl_base_1.0.safetensors "
    "--style-lora ComfyUI/models/loras/my_watercolour.safetensors --style-prompt \"watercolour painting, soft washes\" "
    "--data photos/ --output runs/watercolour --start-strength 0.75": MODEL_COMMANDS,
    "python -m training.sid_lsg --preset sd15-24gb --base v1-5-pruned-emaonly.safetensors --prompts prompts.txt "
    "--output runs/sid --kappa1 2 --kappa2 2 --kappa4 2": MODEL_COMMANDS,
}

#: commands run by another test or by CI: (what runs them, evidence that must hold)
RUN_ELSEWHERE = {
    "cd ComfyUI/custom_nodes": ("the real-host tests install the pack as a clone in custom_nodes/ (a symlink to this "
                                "checkout) and load it with ComfyUI's loader", [CLONE_IN_CUSTOM_NODES]),
    "git clone https://github.com/std-style-transfer/std-style-transfer comfyui-std": (
        "the same: tools/comfy_host.py puts the checkout into custom_nodes/ under the pack's name (CI has no network "
        "to clone from; test_the_clone_url_is_the_projects checks the URL)", [CLONE_IN_CUSTOM_NODES]),
    "pip install -r comfyui-std/requirements.txt": (".ci/run installs requirements-dev.txt, which includes "
                                                    "requirements-app.txt, which includes requirements.txt",
                                                    [INSTALLS_DEV, DEV_HAS_APP, APP_HAS_NODES]),
    "pip install torch --index-url https://download.pytorch.org/whl/cpu": (
        ".ci/run installs the CPU torch wheel first, before anything that depends on torch",
        [Evidence(CI, "python -m pip install -q torch==2.13.0")]),
    "pip install -r requirements-app.txt": (".ci/run installs requirements-dev.txt, which includes it",
                                            [INSTALLS_DEV, DEV_HAS_APP]),
    "pip install -r requirements-dev.txt": (".ci/run", [INSTALLS_DEV]),
    "python -m pytest": (".ci/run runs exactly this", [RUNS_PYTEST]),
    "git clone https://github.com/Comfy-Org/ComfyUI /path/ComfyUI": (
        "not cloned in CI: .ci/run finds the pinned checkout (0.3.64, a125cd84) already in place", [PINNED_COMFY]),
    "git -C /path/ComfyUI checkout a125cd84": ("the same pinned checkout", [PINNED_COMFY]),
    "pip install -r /path/ComfyUI/requirements.txt": (".ci/run installs ComfyUI's requirements minus the torch family",
                                                      [Evidence(CI, '"$MAIN_HOST/requirements.txt"')]),
    "python -m training.std --preset tiny --make-demo-data outputs/demo_data --output outputs/std-demo": (
        "tests/test_train_then_use.py runs the README's train-then-use loop as written", [TRAIN_THEN_USE]),
    "python -m std_app.batch --tiny --lora outputs/std-demo/std_sd15_tiny_eta0.75.safetensors --use-lora "
    "std_sd15_tiny_eta0.75 outputs/demo_data --output outputs/stylized": (
        "tests/test_train_then_use.py runs the README's train-then-use loop as written", [TRAIN_THEN_USE]),
    "python gradio_app.py --tiny --lora outputs/std-demo/std_sd15_tiny_eta0.75.safetensors": (
        "tests/test_train_then_use.py starts it and stylizes with the trained LoRA", [TRAIN_THEN_USE]),
    "python -m std_app.batch --tiny photos/ --output /tmp/stylized": (
        "tests/test_batch_cli.py runs the batch CLI in tiny mode on a folder of images and a clip with audio",
        [Evidence("tests/test_batch_cli.py", '"--tiny"')]),
    "accelerate launch --multi_gpu --num_processes 4 -m std_app.batch ...": (
        "tests/test_batch_cli.py launches it with accelerate on two CPU processes",
        [Evidence("tests/test_batch_cli.py", "--multi_gpu")]),
    "COMFYUI_PATH=/path/ComfyUI python -m pytest": (".ci/run sets COMFYUI_PATH to the checkout and runs pytest",
                                                    [Evidence(CI, "export COMFYUI_PATH="), RUNS_PYTEST]),
}


def commands() -> list[str]:
    """Every page's commands, each once, in page order."""
    found = [c for page in PAGES for c in readme_commands(page.read_text(encoding="utf-8"))]
    return list(dict.fromkeys(found))


def test_the_extractor_reads_blocks_comments_continuations_and_chains():
    text = ("```bash\n# a comment\nfoo --x 1 && bar  # why\npython -m a \\\n    --b c\n```\n\n```\nnot a command\n```\n"
            "  ```sh\n  baz\n  ```\n")
    assert readme_commands(text) == ["foo --x 1", "bar", "python -m a --b c", "baz"]


def test_every_readme_command_is_run_somewhere():
    found = commands()
    assert len(found) >= 20, found  # the extractor found the pages' blocks
    missing = [c for c in found if c not in RUN_HERE and c not in RUN_ELSEWHERE]
    assert not missing, (f"commands of the README or docs/ that no test or CI step runs: {missing}. Run each in a test and list it "
                         f"in RUN_HERE, or point RUN_ELSEWHERE at what runs it (tests/test_readme_commands.py).")
    stale = [c for c in (*RUN_HERE, *RUN_ELSEWHERE) if c not in found]
    assert not stale, f"no longer in any page, remove from tests/test_readme_commands.py: {stale}"
    module = sys.modules[__name__]
    assert all(callable(getattr(module, name, None)) for name in RUN_HERE.values())
    broken = [(c, e) for c, (_, evidence) in RUN_ELSEWHERE.items() for e in evidence if not e.holds()]
    assert not broken, f"the step named for these commands no longer runs them: {broken}"


def the(command_start: str) -> str:
    """The pages' command that starts with ``command_start`` (exactly one, however often it is repeated)."""
    matches = sorted({c for c in commands() if c.startswith(command_start)})
    assert len(matches) == 1, (command_start, matches)
    return matches[0]


def test_the_clone_url_is_the_projects():
    """The README's clone command names the repository of pyproject.toml (bug: a placeholder or a stale URL)."""
    import tomllib

    url = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    clones = [c for c in commands() if c.startswith("git clone") and "ComfyUI" not in c]
    assert clones == [f"git clone {url} comfyui-std"]


def test_the_fresh_venv_commands(tmp_path):
    """Step 2's first line as written, in a scratch folder: the venv is made and activating it switches Python."""
    venv, activate = the("python -m venv"), the(". .venv/bin/activate")
    script = f"cd {tmp_path} && {venv.replace('python', sys.executable, 1)} && {activate} && python -c " \
             f"'import sys; print(sys.prefix)'"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve() == (tmp_path / ".venv").resolve()
    made = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / ".venv").rglob("*") if p.is_file())
    check = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", "--stdin"], input="\n".join(made),
                           capture_output=True, text=True)
    assert set(made) <= set(check.stdout.split("\n")), "the venv made in a clone would show in git status"


def test_the_tiny_app_command_serves_all_tabs(tmp_path):
    """``python gradio_app.py --tiny`` as a newcomer runs it (on a free port, results in a scratch folder): the page
    and its API come up with its four tabs, it prints where it serves, and Gradio's own "set share=True in
    launch()" hint (which contradicts the --share flag) is not shown."""
    assert "python gradio_app.py --tiny" in commands()
    command = "python gradio_app.py --tiny".split()
    assert command[:2] == ["python", "gradio_app.py"]
    port, log = free_port(), tmp_path / "server.log"
    proc = start_cli([*command[2:], "--output-dir", str(tmp_path / "out")], log, port)
    try:
        config = wait_for_config(proc, port, log)
        tabs = [c["props"].get("label") for c in config["components"] if c["type"] in ("tab", "tabitem")]
        assert tabs == ["Image", "Video", "Compare", "One-step"]
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        assert "start timestep 739" in client.predict("std_tiny_i2i_eta0.75", 0.75, True, 8, "official",
                                                      api_name="/plan")
        output = log.read_text()
        assert f"STD app on http://127.0.0.1:{port}/ (serving 127.0.0.1 (this machine only))" in output
        assert "add --listen to serve your network, --share for a public link (with --auth)" in output
        assert "share=True" not in output and "launch()" not in output and "Traceback" not in output
    finally:
        stop(proc)


@pytest.mark.parametrize("command", sorted(c for c, test in RUN_HERE.items() if test == MODEL_COMMANDS))
def test_the_model_commands_take_their_flags(command, tmp_path):
    """The commands that need real model files, run as written from a scratch folder: every flag is accepted, and
    the placeholder paths end in one clear ``error:`` line and exit code 2 (nothing downloads, no traceback)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    script = command.replace("python gradio_app.py", f"{sys.executable} {REPO / 'gradio_app.py'}", 1)
    script = script.replace("python -m", f"{sys.executable} -m", 1)
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: " in proc.stderr and "Traceback" not in proc.stderr
    assert "unrecognized arguments" not in proc.stderr and "invalid choice" not in proc.stderr
