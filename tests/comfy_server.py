"""A real ComfyUI server (``main.py``) in a subprocess, with this pack installed and all it writes in a temp folder.

Not a test module. ``tests/test_comfy_frontend.py`` uses :func:`comfy_server`; the same file is the subprocess's entry
point:

* ``python tests/comfy_server.py launch TREE -- MAIN_ARGS...`` runs ``TREE/main.py`` with ``MAIN_ARGS`` after
  installing the torchvision/torchaudio stub (``comfy_host._stub_torchvision``: PyPI's torchvision/torchaudio do not
  import with the CPU torch used here);
* ``python tests/comfy_server.py models TREE BASE`` writes the tiny SD1.5 checkpoint, a PEFT-format STD LoRA for it
  and a content image into ``BASE`` (ComfyUI's own modules build them, so they are built in a process of their own:
  importing ``comfy.*`` before ``main.py`` would freeze ComfyUI's command-line arguments at their defaults).

The ComfyUI tree is never written into: models, input, output, temp, user folders and the sqlite database live in the
base folder, bytecode is not written (``PYTHONDONTWRITEBYTECODE=1``, cache prefix in the base folder anyway).

The frontend: each ComfyUI release pins ``comfyui-frontend-package==X`` in its requirements.txt. When the installed
package is another version, the server is started with ``--front-end-root $STD_FRONTENDS/X/comfyui_frontend_package/
static`` (``STD_FRONTENDS`` defaults to ``/tmp/std-frontends``), installed by
``pip install --no-deps --target /tmp/std-frontends/X comfyui-frontend-package==X`` (``.ci/run`` does it).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PACK_NAME = "comfyui-std"
FRONTENDS = Path(os.environ.get("STD_FRONTENDS", "/tmp/std-frontends"))
CKPT = "tiny_sd15.safetensors"
LORA = "tiny_std_eta0.75.safetensors"
CONTENT = "std_content.png"


class FrontendMissing(RuntimeError):
    """The ComfyUI tree pins a frontend version that is neither installed nor under ``$STD_FRONTENDS``."""


def pinned(tree: Path, package: str) -> str | None:
    """The ``package==X`` pin of the tree's requirements.txt (None when it pins none)."""
    for line in (Path(tree) / "requirements.txt").read_text().splitlines():
        m = re.match(rf"\s*{re.escape(package)}\s*==\s*([\w.]+)", line, re.I)
        if m:
            return m.group(1)
    return None


def installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_command(version: str) -> str:
    return (f"pip install --no-deps --target {FRONTENDS}/{version} comfyui-frontend-package=={version}")


def frontend_root(tree: Path) -> tuple[str, Path | None]:
    """(the frontend version the tree pins, the ``--front-end-root`` folder for it or None for the installed package).

    Raises FrontendMissing (with the command that installs it) when that version is nowhere to be found."""
    version = pinned(tree, "comfyui-frontend-package")
    if version is None or installed("comfyui-frontend-package") == version:
        return version or installed("comfyui-frontend-package"), None
    static = FRONTENDS / version / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        raise FrontendMissing(
            f"ComfyUI at {tree} pins comfyui-frontend-package=={version}, the installed one is "
            f"{installed('comfyui-frontend-package')} and {static} does not exist; install it with: "
            f"{install_command(version)}")
    return version, static


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, data: dict | None = None, timeout: float = 10):
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def child_env(base: Path, tree: Path) -> dict:
    env = dict(os.environ)
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=str(base / "pycache"), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", COMFYUI_PATH=str(tree),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    return env


def build_models(tree: Path, base: Path, timeout: float = 240) -> None:
    """The tiny checkpoint, LoRA and content image in ``base`` (in a subprocess; see the module docstring)."""
    log = base / "models_build.log"
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, __file__, "models", str(tree), str(base)], env=child_env(base, tree),
                            stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd=str(base)).returncode
    if rc != 0:
        raise RuntimeError(f"building the tiny models failed (rc {rc}):\n{log.read_text()[-4000:]}")


def _tail(path: Path, n: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@contextlib.contextmanager
def comfy_server(tree: Path, base: Path, boot_timeout: float = 240, pack_source: Path = REPO):
    """Start ``tree/main.py`` on a free loopback port with this pack in ``base/custom_nodes/comfyui-std`` (a symlink
    to this checkout, or to ``pack_source``) and the tiny models in ``base``; yields SimpleNamespace(url, base, log,
    proc, frontend, front_end_root); kills the server on exit."""
    tree = Path(tree).resolve()
    version, static = frontend_root(tree)
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    pack = base / "custom_nodes" / PACK_NAME
    if not pack.exists():
        pack.symlink_to(pack_source, target_is_directory=True)
    if not (base / "models" / "checkpoints" / CKPT).exists():
        build_models(tree, base)
    port = free_port()
    args = ["--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
            "--temp-directory", str(base), "--user-directory", str(base / "user"), "--disable-auto-launch",
            "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}",
            "--disable-api-nodes",  # the API (cloud) nodes: slow to import on 2 cores, not what is tested
            "--preview-method", "none"]
    if static is not None:
        args += ["--front-end-root", str(static)]
    log = base / "server.log"
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-u", __file__, "launch", str(tree), "--", *args],
                            env=child_env(base, tree), stdout=out, stderr=subprocess.STDOUT, cwd=str(base),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + boot_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited (rc {proc.returncode}) while booting:\n{_tail(log)}")
            try:
                http_json(f"{url}/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"ComfyUI did not answer on {url} within {boot_timeout:.0f} s:\n{_tail(log)}")
            time.sleep(1)
        yield SimpleNamespace(url=url, base=base, log=log, proc=proc, frontend=version, front_end_root=static)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session (start_new_session): the server and nothing else
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        out.close()


# --------------------------------------------------------------------------------------------------------------------
# subprocess entry points

def _prepare_imports(tree: str) -> None:
    # diffusers/transformers must be imported before the torchvision stub (their image utils probe torchvision).
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    sys.path.insert(0, str(REPO))  # run as a script: the repository's tools/ package
    from tools import comfy_host

    comfy_host._stub_torchvision()
    # main.py's folder first on sys.path, as when it is run as a script (this file's folder, tests/, is dropped).
    sys.path[:] = [tree, *(p for p in sys.path if Path(p or ".").resolve() != TESTS)]


def _launch(tree: str, main_args: list[str]) -> None:
    _prepare_imports(tree)
    import runpy

    sys.argv = [os.path.join(tree, "main.py"), *main_args]
    runpy.run_path(os.path.join(tree, "main.py"), run_name="__main__")


def _models(tree: str, base: str) -> None:
    _prepare_imports(tree)
    import comfy.options  # noqa: F401  (argument parsing stays off: defaults, CPU forced below)
    from comfy.cli_args import args

    args.cpu = True
    import numpy as np
    import torch
    from PIL import Image

    import comfy.sd
    from tools import comfy_host

    base = Path(base)
    ckpt = comfy_host.build_tiny_sd15(base / "models" / "checkpoints" / CKPT)
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=False)[0]
    comfy_host.write_peft_lora(model, base / "models" / "loras" / LORA,
                               metadata={"std.start_strength": "0.75", "std.nfe": "4"})
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(base / "input" / CONTENT)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "launch":
        rest = sys.argv[3:]
        _launch(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest)
    elif len(sys.argv) == 4 and sys.argv[1] == "models":
        _models(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"usage: {sys.argv[0]} launch TREE -- MAIN_ARGS... | models TREE BASE")
