"""training/README's first run, as written: make the demo data and train the tiny preset, then use the exported LoRA
through ``--tiny --lora`` in the batch CLI and the app. Bug caught: any step of the loop a new user follows first
(demo data, export name, --lora with --tiny) broken."""

import re
import shlex
import subprocess
import sys

import pytest

from app_server import REPO, free_port, start_cli, stop, wait_for_config


def first_run_commands() -> list[list[str]]:
    text = (REPO / "training" / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## A first run.*?```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_first_run_loop_runs_as_written(tmp_path):
    train, batch, app = first_run_commands()
    assert train[:3] == ["python", "-m", "training.std"] and batch[:3] == ["python", "-m", "std_app.batch"]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    import os

    env = dict(os.environ, **env)
    for command in (train, batch):
        run = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, (command, run.stderr[-3000:])
    assert len(list((tmp_path / "demo_data").glob("*.png"))) == 12
    assert len(list((tmp_path / "outputs" / "stylized").glob("*.png"))) == 12
    assert app[:2] == ["python", "gradio_app.py"]
    port, log = free_port(), tmp_path / "app.log"
    lora = str(tmp_path / app[app.index("--lora") + 1])
    proc = start_cli([*app[2:app.index("--lora")], "--lora", lora, "--output-dir", str(tmp_path / "out")], log, port)
    try:
        config = wait_for_config(proc, port, log)
    finally:
        stop(proc)
    choices = [c for comp in config["components"] for c in comp.get("props", {}).get("choices", []) or []]
    assert any("std_sd15_tiny_eta0.75" in str(c) for c in choices), "the app does not offer the trained LoRA"


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
