"""Helpers for the Gradio app tests: a free port, the app served in this process, raw HTTP calls to its API.

Not a test module (pytest collects ``test_*.py`` only); the test files import it (``tests/`` is on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app, **launch_kwargs):
    """``gradio_app.build_demo(app)`` served on a free local port; yields (base URL ending in "/", the Blocks)."""
    import gradio_app

    demo = gradio_app.build_demo(app)
    port = free_port()
    gradio_app.launch(demo, app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, **launch_kwargs)
    try:
        yield f"http://127.0.0.1:{port}/", demo
    finally:
        demo.close()


def http(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None,
         timeout: float = 60) -> tuple[int, bytes]:
    """(status, body) of one request; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def call_raw(base: str, api_name: str, data: list, headers: dict | None = None) -> tuple[str, object]:
    """Call an endpoint the way any HTTP client can (``POST /gradio_api/call/<name>``, then read its event stream);
    returns (the last event's name: "complete" or "error", its decoded data; for an error, its message)."""
    status, body = http(f"{base}gradio_api/call/{api_name}", json.dumps({"data": data}).encode(),
                        {"Content-Type": "application/json", **(headers or {})})
    assert status == 200, (status, body[:300])
    event_id = json.loads(body)["event_id"]
    status, body = http(f"{base}gradio_api/call/{api_name}/{event_id}", headers=headers, timeout=300)
    assert status == 200, (status, body[:300])
    event, payload = None, None
    for line in body.decode().splitlines():
        if line.startswith("event: "):
            event = line[7:].strip()
        elif line.startswith("data: ") and event in ("complete", "error"):
            text = line[6:].strip()
            try:
                payload = json.loads(text)
            except json.JSONDecodeError:
                payload = text
    if event == "error" and isinstance(payload, dict) and "error" in payload:
        payload = payload["error"]  # {"error": message, "duration": ..., "title": "Error"}
    return event, payload


def upload_raw(base: str, path: Path, headers: dict | None = None) -> str:
    """Upload a file through ``POST /gradio_api/upload`` (what the browser and gradio_client do); its server path."""
    boundary = "std-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    status, reply = http(f"{base}gradio_api/upload", body,
                         {"Content-Type": f"multipart/form-data; boundary={boundary}", **(headers or {})})
    assert status == 200, (status, reply[:300])
    return json.loads(reply)[0]


def start_cli(args: list[str], log: Path, port: int, env: dict | None = None) -> subprocess.Popen:
    """``python gradio_app.py <args> --port <port>`` from the repository root, its output in ``log``."""
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "gradio_app.py", *args, "--port", str(port)], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_for_config(proc: subprocess.Popen, port: int, log: Path, timeout: float = 240) -> dict:
    """The served app's ``/config`` once it answers (fails with the log's tail when the process ends or stalls)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            status, body = http(f"http://127.0.0.1:{port}/config", timeout=5)
        except OSError:  # not listening yet
            status, body = 0, b""
        if status == 200:
            return json.loads(body)
        time.sleep(0.5)
    raise AssertionError(f"the app did not come up (exit code {proc.poll()}):\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
