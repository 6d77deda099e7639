"""docs/api.md's gradio_client example runs as written against ``python gradio_app.py --tiny``: only the content
(or prompt) is required, the optional inputs take the controls' values, and each endpoint answers."""

import re
import subprocess
import sys

from app_server import REPO, free_port, start_cli, stop, wait_for_config
from media_files import write_clip


def example() -> str:
    text = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/api.md should hold one Python example"
    return blocks[0]


def test_the_documented_client_example_runs_against_the_tiny_app(tmp_path):
    import numpy as np
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    clip = write_clip(tmp_path / "clip.mp4", frames=6, fps=8, size=(32, 32))
    port, log = free_port(), tmp_path / "app.log"
    proc = start_cli(["--tiny", "--output-dir", str(tmp_path / "out")], log, port)
    try:
        wait_for_config(proc, port, log)
        code = example()
        for name, value in (("URL", f"http://127.0.0.1:{port}/"), ("IMAGE", str(image)), ("VIDEO", str(clip))):
            code, n = re.subn(rf'^{name} = ".*"$', f"{name} = {value!r}", code, flags=re.M)
            assert n == 1, name
        script = tmp_path / "example.py"
        script.write_text(code)
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        stop(proc)
    assert run.returncode == 0, run.stderr[-3000:] + log.read_text()[-2000:]
    out = run.stdout
    assert re.search(r"^image: .+\.png seed: \d+$", out, re.M), out
    assert re.search(r"^video: .+\.mp4$", out, re.M), out
    assert "one-step images: 1" in out and "start timestep" in out, out
