"""Every client of the app is untrusted: it reads only files that Gradio received as uploads, and a login is enforced.

The tiny app is served in this process; hostile payloads go to every file input of every endpoint through
gradio_client and through raw HTTP (``POST /gradio_api/call/...``), the way any script on the network can send them.
A path that was never uploaded and a path that does not exist get the same answer, so nothing leaks what exists.
"""

import os
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio import utils as gradio_utils
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import gradio_app
from app_server import call_raw, http, serve, upload_raw
from comfyui_std.core.video import save_video
from std_app.handlers import StyleApp
from std_app.media import refused
from std_app.startup import load_engine, tiny_options

REFUSAL = {what: str(refused(what)) for what in ("content image", "style image", "video")}
META = {"_type": "gradio.FileData"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return StyleApp(load_engine(tiny_options("sd15", tmp_path_factory.mktemp("tiny"))),
                    tmp_path_factory.mktemp("outputs"))


@pytest.fixture(scope="module")
def server(app):
    with serve(app) as (base, demo):
        yield base, demo


@pytest.fixture(scope="module")
def client(server):
    return Client(server[0], verbose=False)


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory):
    """Files on the server that no client uploaded: an image and a video a stranger must not be able to read."""
    d = tmp_path_factory.mktemp("private")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(d / "secret.png")
    save_video(torch.rand(3, 32, 32, 3), d / "secret.mp4", fps=8)
    return d


@pytest.fixture(scope="module")
def planted(secrets_dir):
    """Inside Gradio's own upload folder, but not received through /upload: a symlink to the secret image and a
    copy of it. The allow-list is the upload bookkeeping, not the folder, so both must be refused."""
    folder = Path(gradio_utils.get_upload_folder()) / f"std-test-{secrets.token_hex(6)}"
    folder.mkdir(parents=True)
    (folder / "link.png").symlink_to(secrets_dir / "secret.png")
    (folder / "link.mp4").symlink_to(secrets_dir / "secret.mp4")
    shutil.copy(secrets_dir / "secret.png", folder / "copy.png")
    shutil.copy(secrets_dir / "secret.mp4", folder / "copy.mp4")
    yield folder
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def uploaded(server, tmp_path_factory):
    """A genuine upload (through POST /gradio_api/upload): its server path."""
    d = tmp_path_factory.mktemp("mine")
    yy, xx = np.mgrid[0:48, 0:64]
    Image.fromarray(np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).astype(np.uint8)).save(d / "mine.png")
    return upload_raw(server[0], d / "mine.png")


def settings(lora="std_tiny_i2i_eta0.75") -> list:
    values = dict(prompt="x", negative_prompt="", lora=lora, start_strength=0.75, snap_eta=True, nfe=1, gamma=0.0,
                  cfg=1.0, seed=1, randomize_seed=False, output_size=32, plan="official", style_preset="style",
                  style_weight=1.0, lora_scale=1.0)
    return [values[k] for k in gradio_app.SETTINGS_ORDER]


def endpoint_args(endpoint: str, field: int, hostile, good) -> list:
    """The arguments of ``endpoint`` with ``hostile`` in file input ``field`` (0 content/video, 1 style) and a
    genuine upload (or nothing) in the other."""
    files = [hostile, None] if field == 0 else [good, hostile]
    if endpoint == "stylize_video":
        if field == 1:
            files[0] = None  # the style image is read first, so the refusal comes before the missing video
        return [*files, *settings("std_tiny_v2v_eta0.75"), 4, 0, "shared", 0, 1, "none (frame by frame)"]
    if endpoint == "compare":
        s = settings()
        return [*files, *s[:6], 2, *s[6:]]
    return [*files, *settings()]


FIELDS = [("stylize_image", 0, "content image"), ("stylize_image", 1, "style image"),
          ("compare", 0, "content image"), ("compare", 1, "style image"),
          ("stylize_video", 0, "video"), ("stylize_video", 1, "style image")]


def hostile_payload(kind: str, what: str, secrets_dir: Path, planted: Path, uploaded: str, base: str):
    """One hostile value for a file input (gr.Image and gr.Video both take a FileData dict)."""
    ext = ".mp4" if what == "video" else ".png"
    secret = str(secrets_dir / f"secret{ext}")
    file = {
        "never-uploaded": {"path": secret},
        "missing": {"path": str(secrets_dir / f"no-such-file{ext}")},
        "never-uploaded-with-meta": {"path": secret, "meta": META, "orig_name": f"holiday{ext}"},
        "missing-with-meta": {"path": str(secrets_dir / f"no-such-file{ext}"), "meta": META,
                              "orig_name": f"holiday{ext}"},
        # starts inside a real upload's folder and climbs out to the secret
        "traversal": {"path": os.path.join(os.path.dirname(uploaded), *[".."] * 12, secret.lstrip("/"))},
        "traversal-with-meta": {"path": os.path.join(os.path.dirname(uploaded), *[".."] * 12, secret.lstrip("/")),
                                "meta": META},
        "symlink-in-upload-folder": {"path": str(planted / f"link{ext}")},
        "symlink-in-upload-folder-with-meta": {"path": str(planted / f"link{ext}"), "meta": META},
        "copy-in-upload-folder": {"path": str(planted / f"copy{ext}")},
        # Gradio's preprocessing lets this one through (it is inside its cache folder): only the allow-list stops it
        "copy-in-upload-folder-with-meta": {"path": str(planted / f"copy{ext}"), "meta": META},
        "url": {"path": f"{base}gradio_api/file={secret}", "url": f"{base}gradio_api/file={secret}"},
        "file-url": {"path": f"file://{secret}"},
    }.get(kind)
    if kind == "plain-string":
        return secret  # not a FileData dict at all
    if file is None:
        raise AssertionError(kind)
    return file


KINDS = ["never-uploaded", "missing", "never-uploaded-with-meta", "missing-with-meta", "traversal",
         "traversal-with-meta", "symlink-in-upload-folder", "symlink-in-upload-folder-with-meta",
         "copy-in-upload-folder", "copy-in-upload-folder-with-meta", "url", "file-url", "plain-string"]


def refused_by_gradio(kind: str, what: str) -> bool:
    """Gradio's own preprocessing refuses some values before the handler runs, with no message to the client (the
    same for an existing and a missing file): FileData-marked paths outside its cache folder or through a symlink
    ("not uploaded by a user") and video payloads without the meta marker (gr.Video validates it). Values that are
    not file payloads at all are named by the app's input check first. Everything else reaches the app's
    allow-list."""
    if kind in ("never-uploaded-with-meta", "missing-with-meta", "traversal-with-meta",
                "symlink-in-upload-folder-with-meta"):
        return True
    return what == "video" and not kind.endswith("with-meta")


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("endpoint, field, what", FIELDS, ids=[f"{e}-{w.replace(' ', '_')}" for e, _, w in FIELDS])
def test_a_file_the_app_did_not_receive_is_refused(server, app, secrets_dir, planted, uploaded, endpoint, field, what,
                                                   kind):
    """Raw HTTP, as an attacker's script sends it (gradio_client would *upload* a local path carrying meta, which
    on this shared test machine would be a genuine upload, not an attack)."""
    before = sorted(app.output_dir.iterdir())
    hostile = hostile_payload(kind, what, secrets_dir, planted, uploaded, server[0])
    good = {"path": uploaded, "meta": META}
    event, data = call_raw(server[0], endpoint, endpoint_args(endpoint, field, hostile, good))
    if kind == "plain-string":  # not a file payload at all: named by the app's input check, the path not echoed
        assert event == "error" and "must be" in data and "not a str" in data and "secret" not in data, data
    else:
        assert event == "error" and data == (None if refused_by_gradio(kind, what) else REFUSAL[what]), data
    assert sorted(app.output_dir.iterdir()) == before  # nothing was stylized


IMAGE_FIELDS = [f for f in FIELDS if f[2] != "video"]  # a video payload without meta is refused by Gradio itself


@pytest.mark.bad_input
@pytest.mark.parametrize("endpoint, field, what", IMAGE_FIELDS,
                         ids=[f"{e}-{w.replace(' ', '_')}" for e, _, w in IMAGE_FIELDS])
def test_gradio_client_gets_the_same_refusal(client, uploaded, secrets_dir, endpoint, field, what):
    """Through gradio_client: a FileData dict naming a server path (no meta, so the client sends it as it is)."""
    secret = {"path": str(secrets_dir / "secret.png")}
    with pytest.raises(AppError) as err:
        client.predict(*endpoint_args(endpoint, field, secret, {"path": uploaded, "meta": META}),
                       api_name=f"/{endpoint}")
    assert str(err.value) == REFUSAL[what]


def test_never_uploaded_and_missing_paths_get_one_answer(client, secrets_dir):
    """Existing or not, a path that was not uploaded gets the same message: nothing tells a stranger what exists."""
    answers = []
    for path in (secrets_dir / "secret.png", secrets_dir / "nothing-here.png", Path("/etc/hostname"),
                 Path("/no/such/dir/x.png")):
        with pytest.raises(AppError) as err:
            client.predict({"path": str(path)}, None, *settings(), api_name="/stylize_image")
        answers.append(str(err.value))
    assert len(set(answers)) == 1 and answers[0] == REFUSAL["content image"]
    assert "secret" not in answers[0] and "/etc" not in answers[0]


def test_genuine_uploads_work_through_both_clients(client, server, uploaded, tmp_path):
    """The control: the same endpoints accept what was really uploaded (raw HTTP upload, and gradio_client's)."""
    event, data = call_raw(server[0], "stylize_image", [{"path": uploaded, "meta": META}, None, *settings()])
    assert event == "complete", data
    assert Path(data[0]["path"]).is_file()
    Image.new("RGB", (40, 32), (200, 30, 30)).save(tmp_path / "red.png")
    image, *_ = client.predict(handle_file(str(tmp_path / "red.png")), handle_file(str(tmp_path / "red.png")),
                               *settings(), api_name="/stylize_image")
    assert Image.open(image).size == (32, 24)


def test_a_deleted_upload_says_so(client, server, tmp_path):
    """Only for files the app itself received: an upload that was cleaned away is named as such."""
    Image.new("RGB", (40, 32)).save(tmp_path / "gone.png")
    path = Path(upload_raw(server[0], tmp_path / "gone.png"))
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:  # Gradio may move the upload in a background task
        time.sleep(0.05)
    path.unlink()
    with pytest.raises(AppError, match="content image: the upload 'gone.png' is gone"):
        client.predict({"path": str(path)}, None, *settings(), api_name="/stylize_image")


def test_in_process_calls_need_local_files_on(app, secrets_dir):
    """Outside a served event there is no upload bookkeeping: paths are refused unless the caller opts in."""
    import gradio as gr

    with pytest.raises(gr.Error, match="only files uploaded to this app"):
        app.stylize_image(str(secrets_dir / "secret.png"), None, *settings())
    trusting = StyleApp(app.engine, app.output_dir, app.limits, local_files=True)
    image, *_ = trusting.stylize_image(str(secrets_dir / "secret.png"), None, *settings())
    assert Path(image).is_file()


@pytest.mark.bad_input
@pytest.mark.parametrize("target", ["/etc/hostname", "repo-readme", "secret", "climb-out-of-the-upload-folder"])
def test_the_file_route_serves_no_server_files(server, secrets_dir, target):
    """Gradio's /file= route serves results and uploads only, never a server file a client names."""
    path = {"/etc/hostname": "/etc/hostname", "repo-readme": str(Path(gradio_app.__file__).parent / "README.md"),
            "secret": str(secrets_dir / "secret.png"),
            "climb-out-of-the-upload-folder": f"{gradio_utils.get_upload_folder()}/../../etc/hostname"}[target]
    status, body = http(f"{server[0]}gradio_api/file={path}")
    assert status in (403, 404), (status, body[:200])


# Login -------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def locked(app):
    with serve(app, auth=[("alice", "pa:ss:word"), ("bob", "hunter2")]) as (base, demo):
        yield base


LOCKED_ROUTES = [("GET", "config", None), ("GET", "gradio_api/info", None),
                 ("POST", "gradio_api/call/stylize_image", b'{"data": []}'),
                 ("POST", "gradio_api/call/plan", b'{"data": ["std_tiny_i2i_eta0.75", 0.75, true, 8, "official"]}'),
                 ("POST", "gradio_api/upload", b"--x--"), ("GET", "gradio_api/file=/etc/hostname", None)]


@pytest.mark.bad_input
@pytest.mark.parametrize("method, route, body", LOCKED_ROUTES, ids=[r for _, r, _ in LOCKED_ROUTES])
def test_without_login_the_api_is_closed(locked, method, route, body):
    status, reply = http(f"{locked}{route}", body, {"Content-Type": "application/json"}, method)
    assert status == 401 and b"Not authenticated" in reply


@pytest.mark.bad_input
def test_a_wrong_password_is_refused(locked):
    with pytest.raises(ValueError, match="Could not login"):
        Client(locked, auth=("alice", "pa:ss"), verbose=False)


def test_with_login_the_app_works(locked):
    for user, password in (("alice", "pa:ss:word"), ("bob", "hunter2")):
        text = Client(locked, auth=(user, password), verbose=False).predict(
            "std_tiny_i2i_eta0.75", 0.75, True, 8, "official", api_name="/plan")
        assert "start timestep 739" in text


def test_the_server_still_serves_after_all_that(client, uploaded):
    image, _, info, _ = client.predict({"path": uploaded, "meta": META}, None, *settings(), api_name="/stylize_image")
    assert Path(image).is_file() and "NFE 1" in info



@pytest.mark.bad_input
@pytest.mark.parametrize("endpoint, value, kind", [
    ("/stylize_image", "hello", "an image file"), ("/stylize_image", 5, "an image file"),
    ("/stylize_image", [1, 2], "an image file"), ("/compare", 7.5, "an image file"),
    ("/stylize_video", "clip.mp4", "a file")])
def test_a_wrong_type_where_a_file_belongs_is_named(client, endpoint, value, kind):
    """A string or number where a file belongs: Gradio refused it before any handler with "the upstream Gradio app
    has raised an exception". Now the answer names the endpoint, the input and what it takes."""
    with pytest.raises(AppError) as err:
        client.predict(value, api_name=endpoint)
    message = str(err.value)
    assert f"{endpoint}: input 1 (Content" in message and f"must be {kind}" in message and "upstream" not in message


@pytest.mark.bad_input
def test_a_raw_call_with_too_few_inputs_says_how_many(server):
    """POST /gradio_api/call/stylize_image with 3 of its 17 inputs answered ``{"error": null}``."""
    event, message = call_raw(server[0], "stylize_image", [None, None, None])
    assert event == "error" and message, message
    assert "/stylize_image takes 17 inputs" in message and "the call sent 3" in message


def test_the_input_check_passes_what_gradio_accepts():
    """The pre-check lets through a well-formed file payload and None (bug: a check that refuses real uploads)."""
    import gradio as gr

    from std_app.handlers import api_input_problem

    class Fn:
        api_name, inputs = "x", [gr.Image(label="Content image")]
    assert api_input_problem(Fn, [{"path": "a.png", "meta": META}]) is None
    assert api_input_problem(Fn, [None]) is None
    assert "must be an image file" in api_input_problem(Fn, ["a.png"])
    assert "takes 1 inputs" in api_input_problem(Fn, [])
