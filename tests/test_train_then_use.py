"""The README's train-then-use loop, as written (training/README's first run is the same block): make the demo data
and train the tiny preset, then use the exported LoRA through ``--tiny --lora`` in the batch CLI and the app, from
a scratch folder standing in for the repository root; afterwards every file the commands wrote is one that git
ignores. Bugs caught: any step of the loop a new user follows first (demo data, export name, --lora with --tiny)
broken, and a README command that leaves the clone with untracked files (``git status`` not clean)."""

import os
import re
import shlex
import subprocess
import sys

import pytest
from app_server import REPO, free_port, stop, wait_for_config
from gradio_client import Client, handle_file


def loop_block(page) -> str:
    text = page.read_text(encoding="utf-8")
    match = re.search(r"(?:## Train your own style|## A first run).*?```bash\n(.*?)```", text, re.S)
    assert match, f"{page}: no train-then-use block"
    return match.group(1)


def first_run_commands() -> list[list[str]]:
    block = loop_block(REPO / "README.md")
    return [shlex.split(line) for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_training_readme_shows_the_same_loop():
    strip = lambda block: [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert strip(loop_block(REPO / "training" / "README.md")) == strip(loop_block(REPO / "README.md"))


def not_ignored_by_git(root) -> list[str]:
    """The files under ``root`` (as if it were the repository root) that this repository's .gitignore lets through."""
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert written
    check = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", "--stdin"], input="\n".join(written),
                           capture_output=True, text=True)
    ignored = set(check.stdout.split("\n"))
    return [w for w in written if w not in ignored]


def test_the_first_run_loop_runs_as_written_and_leaves_git_clean(tmp_path):
    train, batch, app = first_run_commands()
    assert train[:3] == ["python", "-m", "training.std"] and batch[:3] == ["python", "-m", "std_app.batch"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for command in (train, batch):
        run = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, (command, run.stderr[-3000:])
    demo = tmp_path / train[train.index("--make-demo-data") + 1]
    assert len(list(demo.glob("*.png"))) == 12
    assert len(list((tmp_path / batch[batch.index("--output") + 1]).glob("*.png"))) == 12
    assert app[:2] == ["python", "gradio_app.py"]
    port, log = free_port(), tmp_path / "app.log"
    with log.open("w") as out:  # as written, from the scratch root: results go to its default outputs/ folder
        proc = subprocess.Popen([sys.executable, str(REPO / "gradio_app.py"), *app[2:], "--port", str(port)],
                                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        config = wait_for_config(proc, port, log)
        choices = [c for comp in config["components"] for c in comp.get("props", {}).get("choices", []) or []]
        trained = [c for c in choices if "std_sd15_tiny_eta0.75" in str(c)]
        assert trained, "the app does not offer the trained LoRA"
        lora = trained[0][-1] if isinstance(trained[0], (list, tuple)) else trained[0]
        image = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            handle_file(str(sorted(demo.glob("*.png"))[0])), lora=lora, nfe=2, api_name="/stylize_image")[0]
        assert image
    finally:
        stop(proc)
    log.unlink()
    assert list((tmp_path / "outputs").glob("**/*.png")), "the app wrote no result under outputs/"
    assert not_ignored_by_git(tmp_path) == [], "README commands leave files git does not ignore"


def test_the_git_clean_check_can_fail(tmp_path):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "a.png").write_bytes(b"x")
    (tmp_path / "demo_data").mkdir()
    (tmp_path / "demo_data" / "b.png").write_bytes(b"x")
    assert not_ignored_by_git(tmp_path) == ["demo_data/b.png"]


def test_demo_data_never_mixes_with_or_overwrites_the_users_files(tmp_path, capsys):
    from training.std.__main__ import main

    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"my picture")
    assert main(["--preset", "tiny", "--make-demo-data", str(mine), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "already holds other files (e.g. holiday.jpg)" in err
    assert sorted(p.name for p in mine.iterdir()) == ["holiday.jpg"]
    assert main(["--preset", "tiny", "--make-demo-data", str(tmp_path / "d"), "--data", str(mine), "--output",
                 str(tmp_path / "o")]) == 2
    assert "leave out --data" in capsys.readouterr().err and not (tmp_path / "d").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("text", ["output: null\n", "max_steps: null\n", "style_prompt: ~\n"])
def test_a_config_null_is_refused_not_turned_into_a_none_folder(tmp_path, capsys, monkeypatch, text):
    """Bug caught: output: null in a YAML config wrote the run into ./None/."""
    from training.std.__main__ import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(text)
    assert main(["--preset", "tiny", "--make-demo-data", "demo", "--config", "run.yaml"]) == 2
    err = capsys.readouterr().err
    assert "got no value (null)" in err and not (tmp_path / "None").exists()
