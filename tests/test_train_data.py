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
