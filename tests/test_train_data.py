"""Training data reads pixels like the nodes and the app (the core's conversion): 16-bit images keep their levels,
EXIF orientation is applied (to the pixels and the bucket), transparency goes on white, TIFFs are data, and videos are
probed by the core reader."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_std.core.video import save_video
from training.common.data import load_pixels, read_image, scan_folder


def _half_red_half_blue(w: int, h: int) -> np.ndarray:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2:] = (0, 0, 255)
    return arr


def test_a_16_bit_png_keeps_its_levels(tmp_path):
    level = 20000  # 0.305 of 65535; clipped 8-bit conversion makes it white
    Image.fromarray(np.full((16, 24), level, np.uint16)).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode.startswith("I;16")
    (item,), skipped = scan_folder(str(tmp_path))
    assert skipped == 0 and (item.width, item.height) == (24, 16)
    pixels, _ = load_pixels(item, (16, 24), None, flip=False)
    expected = 2 * level / 65535 - 1
    assert pixels.shape == (3, 16, 24)
    assert torch.allclose(pixels, torch.full_like(pixels, expected), atol=1e-4)


def test_exif_orientation_turns_the_pixels_and_the_bucket(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x20, shown turned 90 degrees clockwise: 20 wide, 40 high
    Image.fromarray(_half_red_half_blue(40, 20)).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    (item,), _ = scan_folder(str(tmp_path))
    assert (item.width, item.height) == (20, 40)  # the size it is shown at picks the bucket
    pixels, _ = load_pixels(item, (40, 20), None, flip=False)
    rgb = (pixels + 1) / 2
    top, bottom = rgb[:, :16].mean(dim=(1, 2)), rgb[:, 24:].mean(dim=(1, 2))
    assert top[0] > 0.8 and top[2] < 0.2  # the stored left (red) half is shown on top
    assert bottom[2] > 0.8 and bottom[0] < 0.2


def test_transparent_pixels_go_on_white_and_the_notice_is_logged_once(tmp_path, caplog):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 255
    arr[:, 4:, 3] = 255  # left half fully transparent red, right half opaque red
    Image.fromarray(arr, "RGBA").save(tmp_path / "alpha.png")
    with caplog.at_level(logging.INFO, logger="training"):
        rgb = read_image(tmp_path / "alpha.png")
        read_image(tmp_path / "alpha.png")
    assert torch.equal(rgb[:, :4], torch.ones(8, 4, 3))
    assert torch.equal(rgb[:, 4:], torch.tensor([1.0, 0.0, 0.0]).expand(8, 4, 3))
    assert sum("placed on white" in r.message for r in caplog.records) == 1


def test_tiff_images_are_data_and_a_video_is_probed_by_the_core_reader(tmp_path):
    Image.fromarray(_half_red_half_blue(16, 8)).save(tmp_path / "a.tif")
    save_video(torch.rand(7, 32, 48, 3, generator=torch.Generator().manual_seed(0)), tmp_path / "clip.mp4", 8)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    items, skipped = scan_folder(str(tmp_path))
    found = {i.path.name: (i.width, i.height, i.frames, i.video) for i in items}
    assert found == {"a.tif": (16, 8, 1, False), "clip.mp4": (48, 32, 7, True)}
    assert skipped == 1
    clips, _ = scan_folder(str(tmp_path), videos=True, clip_span=7)
    assert [c.path.name for c in clips] == ["clip.mp4"]
    with pytest.raises(ValueError, match="no readable videos"):
        scan_folder(str(tmp_path), videos=True, clip_span=8)  # one frame short of a clip


# -- hostile folders --------------------------------------------------------------------------------------------------

def _img(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.bad_input
@pytest.mark.parametrize("kind, message", [("fifo", "not a regular file"), ("folder", "not a regular file"),
                                           ("dev_zero", "outside the data folder"), ("huge", "captions are at most"),
                                           ("outside", "outside the data folder")])
def test_a_caption_that_is_not_a_small_text_file_inside_the_folder_is_refused(tmp_path, kind, message):
    """Bug caught: a FIFO caption blocked the trainer forever, a folder gave a traceback, a link to /dev/zero ate
    memory, a 10 MB caption was taken whole (into every bank checkpoint), a link out of the folder was read."""
    import os

    from training.common.data import DataError

    data = tmp_path / "data"
    _img(data / "img1.png")
    cap = data / "img1.txt"
    if kind == "fifo":
        os.mkfifo(cap)
    elif kind == "folder":
        cap.mkdir()
    elif kind == "dev_zero":
        cap.symlink_to("/dev/zero")
    elif kind == "huge":
        cap.write_text("a watercolour " * 10_000)
    else:
        (tmp_path / "secret.txt").write_text("not yours")
        cap.symlink_to(tmp_path / "secret.txt")
    with pytest.raises(DataError, match=message):
        scan_folder(str(data))


@pytest.mark.bad_input
def test_links_out_of_the_folder_loops_and_pipes_are_skipped_with_a_notice(tmp_path, caplog):
    import os

    data = tmp_path / "data"
    _img(data / "a.png")
    outside = _img(tmp_path / "elsewhere" / "b.png", 1)
    (data / "b.png").symlink_to(outside)  # a file link out of the folder
    (data / "loop").symlink_to(data)  # a folder link back into the folder
    (data / "gone.png").symlink_to(tmp_path / "missing.png")
    os.mkfifo(data / "pipe.png")
    _img(data / "inside" / "c.png", 2)
    (data / "c_link.png").symlink_to(data / "inside" / "c.png")  # a link inside the folder is followed
    with caplog.at_level(logging.WARNING, logger="training"):
        items, _ = scan_folder(str(data))
    assert sorted(i.path.name for i in items) == ["a.png", "c.png", "c_link.png"]
    text = caplog.text
    assert "b.png links out of 'data'" in text and "links back into a folder already read" in text
    assert "gone.png is a broken or circular link" in text and "pipe.png is not a regular file" in text


def test_a_run_folder_inside_the_data_folder_is_not_data(tmp_path, caplog):
    """Bug caught: --output D/run then --resume trained on the run's own preview grid."""
    data = tmp_path / "data"
    for i in range(4):
        _img(data / f"{i}.png", i)
    _img(data / "run" / "previews" / "step-000002.png", 9)
    with caplog.at_level(logging.WARNING, logger="training"):
        items, _ = scan_folder(str(data), exclude=(data / "run",))
    assert len(items) == 4 and "is the run's own output folder: not read" in caplog.text
