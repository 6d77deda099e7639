"""``python -m std_app.batch``: folders of images and videos in tiny mode, resuming, bad files and arguments, and two
processes through accelerate.

The done-when run and the accelerate run are subprocesses, as a user runs them; the other runs call
``std_app.batch.main`` in-process with the tiny zoo named by the ordinary model flags (``--models-dir`` ...).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from media_files import write_audio_only, write_clip, write_damaged_clip, write_unknown_codec
from std_app import batch, tiny

REPO = Path(__file__).resolve().parents[1]
FAST = ["--nfe", "2", "--size", "32", "--frames-per-batch", "4", "--overlap", "1", "--prompt", "an oil painting"]


def image(path: Path, size=(40, 56), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def streams(path: Path) -> tuple[int, list[str]]:
    with av.open(str(path)) as c:
        kinds = [s.type for s in c.streams]
        frames = sum(1 for _ in c.decode(video=0))
    return frames, kinds


def run_cli(args, cwd=REPO, env=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "std_app.batch", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tiny.build_tiny_models(tmp_path_factory.mktemp("tiny"), "sd15")


@pytest.fixture(scope="module")
def flags(zoo):
    """The tiny zoo through the ordinary model flags (what --tiny builds)."""
    return ["--models-dir", zoo, "--base", tiny.base_name("sd15"), "--ip-adapter", tiny.TINY_FILES["ip_adapter"],
            "--image-encoder", tiny.TINY_FILES["image_encoder"], "--device", "cpu", "--dtype", "fp32"]


def main(*args) -> int:
    return batch.main([str(a) for a in args])


def report(path: Path) -> dict:
    return {Path(o["source"]).name: o for o in json.loads(path.read_text())}


def test_folder_of_two_images_and_a_clip_with_audio(tmp_path):
    """The done-when run: --tiny, a folder with two images and a 12-frame clip with audio -> three outputs."""
    src = tmp_path / "in"
    image(src / "a.png"), image(src / "b.jpg", (64, 48), 1)
    write_clip(src / "clip.mp4", frames=12, fps=12)
    out = tmp_path / "out"
    res = run_cli(["--tiny", src, "--output", out, *FAST, "--report", tmp_path / "r.json"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "device cpu; memory plan on cpu (no limit): offload none" in res.stderr  # stated at start
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "clip.mp4"]
    frames, kinds = streams(out / "clip.mp4")
    assert frames == 12 and kinds == ["video", "audio"]
    with av.open(str(out / "clip.mp4")) as c:
        assert float(c.streams.video[0].average_rate) == 12
    with Image.open(out / "a.png") as im:
        record = json.loads(im.text["std"])
        assert im.size == (32, 24) and "Steps: 2" in im.text["parameters"]
    assert record["source"] == "a.png" and record["lora"] == "std_tiny_i2i_eta0.75"
    assert "3 stylized (14 frames" in res.stdout and "0 failed" in res.stdout
    assert report(tmp_path / "r.json")["clip.mp4"]["notices"] == ["audio copied (aac)"]
    # a second run resumes: everything is there, nothing is loaded or rewritten
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_cli(["--tiny", src, "--output", out, *FAST])
    assert again.returncode == 0 and "3 skipped" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_overwrite_recursive_and_the_settings(tmp_path, flags):
    src = tmp_path / "in"
    image(src / "top.png")
    image(src / "sub" / "deep.png", seed=2)
    out = tmp_path / "out"
    assert main(src, "--output", out, *flags, *FAST, "--recursive", "--seed", "7", "--use-lora", "none") == 0
    assert (out / "top.png").exists() and (out / "sub" / "deep.png").exists()
    first = (out / "top.png").read_bytes()
    with Image.open(out / "top.png") as im:
        assert json.loads(im.text["std"])["lora"] is None
    assert main(src, "--output", out, *flags, *FAST, "--recursive", "--seed", "7", "--use-lora", "none") == 0
    assert (out / "top.png").read_bytes() == first  # skipped
    assert main(src, "--output", out, *flags, *FAST, "--recursive", "--seed", "8", "--overwrite") == 0
    with Image.open(out / "top.png") as im:
        record = json.loads(im.text["std"])
    assert record["settings"]["seed"] == 8 and record["lora"] == "std_tiny_i2i_eta0.75"
    assert (out / "top.png").read_bytes() != first


def test_frames_folder_becomes_one_video(tmp_path, flags):
    from media_files import numbered_frame

    frames = tmp_path / "shot"
    frames.mkdir()
    for i in range(5):
        Image.fromarray(numbered_frame(i, 24, 32)).save(frames / f"{i:04d}.png")
    out = tmp_path / "out"
    assert main(frames, "--frames-folder", "--output", out, *flags, *FAST) == 0
    assert os.listdir(out) == ["shot.mp4"] and streams(out / "shot.mp4") == (5, ["video"])


# Bad files: one run over a folder of them, the run goes on ----------------------------------------------------
BAD_FILES = {
    "corrupt.png": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
    "zero.mp4": lambda p: p.write_bytes(b""),
    "corrupt.mp4": lambda p: p.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20),
    "audio_only.mp4": write_audio_only,
    "unknown_codec.mp4": write_unknown_codec,
    "blocked.png": lambda p: image(p),  # its output path is taken by a folder
}
EXPECTED = {
    "corrupt.png": "'corrupt.png' is not an image that can be read",
    "zero.mp4": "could not decode 'zero.mp4'",
    "corrupt.mp4": "could not decode 'corrupt.mp4'",
    "audio_only.mp4": "'audio_only.mp4' has no video stream",
    "unknown_codec.mp4": "'unknown_codec.mp4': its video codec cannot be decoded",
    "blocked.png": "output: could not write 'blocked.png'",
}


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, flags):
    d = tmp_path_factory.mktemp("bad")
    src, out = d / "in", d / "out"
    src.mkdir()
    for name, make in BAD_FILES.items():
        make(src / name)
    image(src / "good.png")
    image(src / "odd.png", (23, 37), 3)
    write_clip(src / "one_frame.mp4", frames=1)
    write_clip(src / "vfr.mp4", frames=12, pts_ms=[0, 40, 80, 200, 320, 360, 400, 520, 640, 680, 720, 840])
    write_clip(src / "odd.webm", frames=5, size=(27, 41))
    write_damaged_clip(src / "damaged.mp4")
    (out / "blocked.png").mkdir(parents=True)
    status = main(src, "--output", out, *flags, *FAST, "--report", d / "r.json")
    return status, report(d / "r.json"), out


def test_bad_files_fail_alone_and_the_exit_status_says_so(bad_run):
    status, outcomes, out = bad_run
    assert status == 1
    assert {n for n, o in outcomes.items() if o["status"] == "done"} == {"good.png", "odd.png", "one_frame.mp4",
                                                                        "vfr.mp4", "odd.webm", "damaged.mp4"}
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    assert sorted(p.name for p in out.iterdir()) == ["blocked.png", "damaged.mp4", "good.png", "odd.png", "odd.webm",
                                                     "one_frame.mp4", "vfr.mp4"]


@pytest.mark.bad_input
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_reported_with_its_name_and_reason(bad_run, name):
    _, outcomes, out = bad_run
    assert outcomes[name]["status"] == "failed" and EXPECTED[name] in outcomes[name]["reason"]
    if name != "blocked.png":
        assert not (out / (Path(name).stem + (".png" if name.endswith(".png") else ".mp4"))).exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("name, frames", [("one_frame.mp4", 1), ("odd.webm", 5)])
def test_short_and_odd_videos_are_stylized(bad_run, name, frames):
    _, outcomes, out = bad_run
    assert outcomes[name]["status"] == "done" and streams(out / name) == (frames, ["video", "audio"])


@pytest.mark.bad_input
def test_variable_frame_rate_video_is_resampled_with_a_notice(bad_run):
    _, outcomes, out = bad_run
    assert any("variable frame rate" in n for n in outcomes["vfr.mp4"]["notices"])
    with av.open(str(out / "vfr.mp4")) as c:
        rate = float(c.streams.video[0].average_rate)
    assert abs(streams(out / "vfr.mp4")[0] / rate - 0.88) < 0.15  # the clip's duration is kept


@pytest.mark.bad_input
def test_a_damaged_video_is_stylized_with_a_notice_that_says_so(bad_run):
    """600 bytes of the clip's frame data overwritten: it decodes, but the decoder reports errors; the run says the
    file is damaged instead of a plain "done". Intact clips get no such notice."""
    _, outcomes, out = bad_run
    assert outcomes["damaged.mp4"]["status"] == "done"
    assert any("'damaged.mp4' is damaged: the decoder reported" in n for n in outcomes["damaged.mp4"]["notices"])
    assert not any("damaged" in n for name in ("vfr.mp4", "odd.webm", "one_frame.mp4")
                   for n in outcomes[name]["notices"])


@pytest.mark.bad_input
def test_odd_image_size(bad_run):
    _, outcomes, out = bad_run
    with Image.open(out / "odd.png") as im:
        assert im.size == (32, 16)  # long side 32, multiples of 8, aspect kept as far as 8-pixel steps allow


@pytest.mark.bad_input
def test_failure_mid_video_keeps_the_previous_output(tmp_path, flags, monkeypatch):
    """--overwrite of a finished output by a run that fails halfway: the old file stays, nothing half-written."""
    from std_app.engine import STDEngine

    src = write_clip(tmp_path / "clip.mp4", frames=12)
    out = tmp_path / "out"
    out.mkdir()
    (out / "clip.mp4").write_bytes(b"previous result")
    calls = [0]
    decode = STDEngine.decode

    def failing(self, latents, batch):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return decode(self, latents, batch)

    monkeypatch.setattr(STDEngine, "decode", failing)
    assert main(src, "--output", out, *flags, *FAST, "--overwrite") == 1
    assert (out / "clip.mp4").read_bytes() == b"previous result" and os.listdir(out) == ["clip.mp4"]


# Bad arguments: error: ... and exit status 2, before any model is loaded ----------------------------------------
def _missing(d):
    return [d / "nope.png"]


def _text(d):
    (d / "notes.txt").write_text("x")
    return [d / "notes.txt"]


def _empty(d):
    (d / "empty").mkdir()
    return [d / "empty"]


def _collision(d):
    return [image(d / "a" / "x.png"), image(d / "b" / "x.jpg")]


def _same_folder(d):
    image(d / "in" / "x.png")
    return [d / "in", "--output", d / "in", "--overwrite"]


def _output_is_file(d):
    (d / "out.txt").write_text("x")
    return [image(d / "x.png"), "--output", d / "out.txt"]


def _output_under_file(d):
    (d / "f").write_text("x")
    return [image(d / "x.png"), "--output", d / "f" / "out"]


def _flag(*extra):
    """An image input and these flags (callables get the test's folder)."""
    return lambda d: [image(d / "x.png"), *(e(d) if callable(e) else e for e in extra)]


@pytest.mark.bad_input
@pytest.mark.parametrize("make, match", [
    (_missing, "input '.*nope.png' does not exist"),
    (_text, "'.*notes.txt' is not an image or a video"),
    (_empty, "folder '.*empty' has no images or videos"),
    (_collision, "would both be written to"),
    (_same_folder, "would replace the input"),
    (_output_is_file, "is a file, not a folder"),
    (_output_under_file, "cannot create the --output folder"),
    (_flag("--nfe", "0"), "nfe"),
    (_flag("--frames-per-batch", "4", "--overlap", "4"), "overlap"),
    (_flag("--start-strength", "1.5"), "start_strength"),
    (_flag("--size", "3"), "size"),
    (_flag("--style", lambda d: d / "none.png"), "--style .* is not a file"),
    (_flag("--report", lambda d: d / "no" / "r.json"), "--report"),
    (_flag("--report", lambda d: d), "--report .* is a folder; give a file name"),
    (_flag("--frame-load-cap", "-1"), "frame_load_cap: got -1"),
    (_flag("--select-every-nth", "0"), "select_every_nth: got 0"),
])
def test_bad_arguments(tmp_path, capsys, make, match):
    import re

    args = make(tmp_path)
    if "--output" not in args:
        args = [*args, "--output", tmp_path / "out"]
    assert main(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.bad_input
def test_unknown_lora_after_loading(tmp_path, flags, capsys):
    assert main(image(tmp_path / "x.png"), "--output", tmp_path / "out", *flags, "--use-lora", "nope") == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: lora: 'nope' is not one of the loaded LoRAs") and not list((tmp_path / "out").iterdir())


@pytest.mark.bad_input
def test_bad_flag_values_are_argparse_errors(tmp_path):
    res = run_cli([image(tmp_path / "x.png"), "--output", tmp_path / "o", "--noise", "random"])
    assert res.returncode == 2 and "error: argument --noise: invalid choice" in res.stderr
    assert "Traceback" not in res.stderr


# Two processes ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_splits_the_inputs_across_two_processes(tmp_path):
    src = tmp_path / "in"
    for i in range(3):
        image(src / f"img{i}.png", seed=i)
    write_clip(src / "clip.mp4", frames=6)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "std_app.batch", "--tiny", src, "--output", out, *FAST,
           "--report", tmp_path / "r.json"]
    res = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    outcomes = json.loads((tmp_path / "r.json").read_text())
    assert sorted(Path(o["output"]).name for o in outcomes) == ["clip.mp4", "img0.png", "img1.png", "img2.png"]
    assert all(o["status"] == "done" for o in outcomes)
    assert sorted(o["rank"] for o in outcomes) == [0, 0, 1, 1]  # each input once, two per process
    assert res.stdout.count("4 stylized") == 1  # one summary, from the first process
    assert streams(out / "clip.mp4") == (6, ["video", "audio"])


def test_tiny_mode_takes_the_lora_files_named_with_lora(zoo, tmp_path):
    """Bug caught: --lora ignored with --tiny (then --use-lora says the LoRA is not loaded)."""
    mine = tmp_path / "my_style.safetensors"
    mine.write_bytes((zoo / "loras" / "std_tiny_i2i_eta0.75.safetensors").read_bytes())
    assert main("--tiny", "--lora", mine, "--use-lora", "my_style", image(tmp_path / "in" / "a.png"),
                "--output", tmp_path / "out", "--nfe", "2", "--size", "32", "--report", tmp_path / "r.json") == 0
    assert report(tmp_path / "r.json")["a.png"]["status"] == "done"
    from PIL import Image as PILImage

    with PILImage.open(tmp_path / "out" / "a.png") as im:
        assert json.loads(im.info["std"] if "std" in im.info else im.info["parameters"])["lora"] == "my_style"


LIBRARY_NOISE = ("requires torchvision", "Writing model shards", "should be kept in float32",
                 "No LoRA keys associated")


def test_a_quiet_start_shows_only_the_projects_messages_and_verbose_shows_the_rest(tmp_path):
    """Bug caught: library chatter back at every start (or --verbose that hides it too)."""
    src = image(tmp_path / "in" / "a.png")
    quiet = run_cli(["--tiny", src, "--output", tmp_path / "q", "--nfe", "2", "--size", "32"], cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert not [n for n in LIBRARY_NOISE if n in quiet.stderr], quiet.stderr[-3000:]
    assert "memory plan" in quiet.stderr  # the project's own start line stays
    loud = run_cli(["--tiny", src, "--output", tmp_path / "v", "--nfe", "2", "--size", "32", "--verbose"],
                   cwd=tmp_path)
    assert loud.returncode == 0 and [n for n in LIBRARY_NOISE if n in loud.stderr], loud.stderr[-3000:]


@pytest.mark.bad_input
@pytest.mark.parametrize("where", ["input", "output"])
def test_the_report_never_replaces_an_input_or_an_output(tmp_path, capsys, where):
    """Bug caught: --report in/x.png overwrote the input with JSON; --report OUT/x.png replaced the stylized image
    (and the next run skipped it as done)."""
    src = image(tmp_path / "in" / "x.png")
    before = src.read_bytes()
    report_path = src if where == "input" else tmp_path / "out" / "x.png"
    (tmp_path / "out").mkdir()
    assert main("--tiny", src, "--output", tmp_path / "out", "--report", report_path, "--nfe", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --report") and ("is an input" in err if where == "input" else "output for" in err), err
    assert src.read_bytes() == before and not list((tmp_path / "out").iterdir())


def test_recursive_runs_skip_their_own_outputs_inside_the_input_tree(tmp_path):
    """Bug caught: with the output folder inside the input tree, a second --recursive run stylized the first run's
    outputs (and could not resume)."""
    src = tmp_path / "in"
    image(src / "a.png")
    out = src / "stylized"
    args = ["--tiny", src, "--recursive", "--output", out, "--nfe", "2", "--size", "32", "--report",
            tmp_path / "r.json"]
    assert main(*args) == 0 and sorted(p.name for p in out.iterdir()) == ["a.png"]
    assert main(*args) == 0
    assert [o["status"] for o in report(tmp_path / "r.json").values()] == ["skipped"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a.png"]



@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", [
    (["--size", "8"], "error: size: got 8, allowed range is [32, 16384]"),
    (["--prompt", "an oil painting \udcff"], "error: prompt: is not valid UTF-8 text (at character 16)"),
    (["--prompt", "x" * 5000], "error: prompt: is 5000 characters long; at most 4096"),
    (["--negative-prompt", "\udcfe"], "error: negative_prompt: is not valid UTF-8 text"),
])
def test_sizes_and_texts_that_cannot_run_are_refused_before_loading(tmp_path, capsys, args, message):
    """Bug caught: --size 8 gave a torch error about channels (and squashed clips silently); a non-UTF-8 prompt gave
    a tokenizer TypeError per file; a 10 MB prompt was taken whole."""
    src = image(tmp_path / "in" / "a.png")
    assert main("--tiny", src, "--output", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.bad_input
def test_input_folder_links_loops_and_pipes_are_left_out_with_a_notice(tmp_path):
    """The batch CLI walks input folders with the project's one folder walk: a link to a file outside the folder, a
    link loop, a dangling link and a FIFO are each left out with a notice naming them (before: the link out was
    followed, the rest skipped without a word), and the good image is still found. Bug caught: a second walk in the
    CLI. A folder left with nothing says why in its error."""
    from std_app.batch import collect_jobs

    src, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    (src / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    image(src / "good.png")
    image(elsewhere / "secret.png")
    (src / "outside.png").symlink_to(elsewhere / "secret.png")
    (src / "sub" / "loop").symlink_to(src, target_is_directory=True)
    (src / "dangling.png").symlink_to(tmp_path / "missing.png")
    os.mkfifo(src / "pipe.png")
    notices: list[str] = []
    jobs = collect_jobs([src], tmp_path / "out", recursive=True, notices=notices)
    assert [j.source.name for j in jobs] == ["good.png"]
    text = "\n".join(notices)
    assert "outside.png links out of 'in'" in text and "loop links back into a folder already read" in text
    assert "dangling.png is a broken or circular link" in text and "pipe.png is not a regular file" in text
    only_links = tmp_path / "links"
    only_links.mkdir()
    (only_links / "a.png").symlink_to(elsewhere / "secret.png")
    with pytest.raises(batch.UsageError, match=r"has no images or videos.*a\.png links out of 'links'"):
        collect_jobs([only_links], tmp_path / "out")


@pytest.mark.bad_input
def test_the_walk_notices_reach_the_user(tmp_path, capsys, flags):
    src = tmp_path / "in"
    src.mkdir()
    image(src / "good.png")
    (src / "loop").symlink_to(src, target_is_directory=True)
    assert main(src, "--recursive", "--output", tmp_path / "out", *flags, *FAST) == 0
    assert "notice: " in capsys.readouterr().err and (tmp_path / "out" / "good.png").exists()


@pytest.mark.bad_input
def test_an_exif_rotated_image_is_not_called_squashed(tmp_path, capsys, flags):
    """A 48x96 photo stored with EXIF orientation 6 is seen (and stylized) as 96x48. The size notice compared the
    stored size with the turned one and told the user it was "squashed" although the rotation was right."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 48, 3), dtype=np.uint8)).save(
        src / "turned.jpg", exif=exif)
    assert main(src / "turned.jpg", "--output", out, *flags, *FAST, "--report", tmp_path / "r.json") == 0
    notices = report(tmp_path / "r.json")["turned.jpg"]["notices"]
    assert not any("squashed" in n for n in notices), notices
    with Image.open(out / "turned.png") as im:
        assert im.width > im.height  # turned as the EXIF says
