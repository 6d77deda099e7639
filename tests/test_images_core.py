"""Still-image input: exact mode conversion (16-bit, float, palette, CMYK, alpha) and image folders as one batch."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_std.core.errors import STDInputError
from comfyui_std.core.images import image_to_float, load_image_folder


def test_sixteen_bit_and_float_images_keep_their_levels():
    ramp16 = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    rgb, alpha, _ = image_to_float(Image.fromarray(ramp16))  # a 16-bit grey PNG opens as I;16
    assert alpha is None and rgb.shape == (64, 64, 3)
    assert torch.allclose(rgb[..., 0], torch.from_numpy(ramp16 / 65535.0).float(), atol=1e-6)
    assert 0.45 < float(rgb.mean()) < 0.55  # not clipped to white (what convert("RGB") does)
    as_int = Image.fromarray(ramp16.astype(np.int32), mode="I")
    assert torch.allclose(image_to_float(as_int)[0], rgb, atol=1e-6)
    floats = Image.fromarray((ramp16 / 65535.0).astype(np.float32), mode="F")
    assert torch.allclose(image_to_float(floats)[0], rgb, atol=1e-6)
    eight = Image.fromarray((ramp16 // 257).astype(np.uint8).astype(np.int32), mode="I")  # 8-bit values in mode I
    rgb8, _, notices = image_to_float(eight, "content image")
    assert float(rgb8.max()) == 1.0 and notices == ["The content image has 32-bit integer pixels: values 0..255 "
                                                    "were mapped to 0..255."]
    with pytest.raises(STDInputError, match="NaN or infinite pixels"):
        image_to_float(Image.fromarray(np.full((2, 2), np.nan, np.float32), mode="F"))


def test_sixteen_bit_png_file_round_trip(tmp_path):
    arr = np.full((8, 8), 30000, np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        rgb, _, _ = image_to_float(im)
    assert abs(float(rgb.mean()) - 30000 / 65535) < 1e-6


def test_palette_alpha_cmyk_and_exif_orientation():
    pal = Image.new("P", (4, 4))
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.info["transparency"] = 0
    rgb, alpha, _ = image_to_float(pal)
    assert torch.equal(alpha, torch.zeros(4, 4)) and torch.allclose(rgb[0, 0], torch.tensor([1.0, 0, 0]))
    la = Image.fromarray(np.stack([np.full((4, 4), 128, np.uint8), np.full((4, 4), 64, np.uint8)], 2), "LA")
    rgb, alpha, _ = image_to_float(la)
    assert abs(float(alpha.mean()) - 64 / 255) < 1e-6 and abs(float(rgb.mean()) - 128 / 255) < 1e-6
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert torch.allclose(image_to_float(cmyk)[0][0, 0], torch.tensor([1.0, 0, 0]), atol=1 / 255)
    wide = Image.new("RGB", (6, 2))
    exif = wide.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    wide.info["exif"] = exif.tobytes()
    tagged = Image.open(_roundtrip_jpeg(wide, exif))
    assert image_to_float(tagged)[0].shape[:2] == (6, 2)


def _roundtrip_jpeg(image, exif):
    import io

    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    buf.seek(0)
    return buf


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "shots"
    d.mkdir()
    for i in (1, 2, 10):
        Image.new("RGB", (20, 12), (i * 20, 0, 0)).save(d / f"img{i}.png")
    (d / "notes.txt").write_text("not an image")
    return d


def test_folder_sorts_caps_and_skips(folder):
    images, alphas, info = load_image_folder(folder)
    assert info.names == ["img1.png", "img2.png", "img10.png"] and images.shape == (3, 12, 20, 3)
    assert torch.equal(alphas, torch.ones(3, 12, 20))
    assert load_image_folder(folder, sort="name")[2].names == ["img1.png", "img10.png", "img2.png"]
    os.utime(folder / "img10.png", ns=(1, 1))
    assert load_image_folder(folder, sort="modified")[2].names[0] == "img10.png"
    _, _, info = load_image_folder(folder, image_load_cap=1, skip_first_images=1)
    assert info.names == ["img2.png"] and info.total == 3
    assert load_image_folder(folder, resize="crop")[0].shape == (3, 8, 16, 3)
    assert load_image_folder(folder, resize="pad")[0].shape == (3, 16, 24, 3)
    assert load_image_folder(folder, resize="stretch")[0].shape == (3, 16, 16, 3)  # nearest multiples (as the video loader)


def test_folder_with_other_sizes_is_refused_or_fitted_as_asked(folder):
    Image.new("RGBA", (10, 30), (0, 255, 0, 0)).save(folder / "img3.png")
    with pytest.raises(STDInputError, match="'img3.png' is 10x30 but the first image is 20x12"):
        load_image_folder(folder)
    images, alphas, info = load_image_folder(folder, mismatch="crop to first")
    assert images.shape == (4, 12, 20, 3) and info.adjusted == ["img3.png"]
    assert float(alphas[2].max()) == 0.0 and float(alphas[0].min()) == 1.0  # img3 is transparent, others opaque
    assert "1 of another size fitted to the first (img3.png)" in info.describe()
    assert load_image_folder(folder, mismatch="stretch to first")[0].shape == (4, 12, 20, 3)


@pytest.mark.bad_input
@pytest.mark.parametrize("case, match", [
    ("missing", "'nope' is not a folder"), ("empty", "has no images"), ("corrupt", "could not read 'bad.png'"),
    ("skip-all", "skipping 9 leaves none"), ("bad-sort", "sort: got 'size'"), ("bad-mismatch", "mismatch: got 'pad'"),
    ("negative-cap", r"image_load_cap: got -1"), ("tiny-crop", "smaller than 8 pixels; use pad or stretch"),
])
def test_folder_bad_input(folder, tmp_path, case, match):
    kwargs = {}
    target = folder
    if case == "missing":
        target = tmp_path / "nope"
    elif case == "empty":
        target = tmp_path / "empty"
        target.mkdir()
    elif case == "corrupt":
        (folder / "bad.png").write_bytes(b"\x89PNG broken")
    elif case == "skip-all":
        kwargs["skip_first_images"] = 9
    elif case == "bad-sort":
        kwargs["sort"] = "size"
    elif case == "bad-mismatch":
        kwargs["mismatch"] = "pad"
    elif case == "negative-cap":
        kwargs["image_load_cap"] = -1
    else:
        target = tmp_path / "tiny"
        target.mkdir()
        Image.new("RGB", (4, 4)).save(target / "a.png")
        kwargs["resize"] = "crop"
    with pytest.raises(STDInputError, match=match):
        load_image_folder(target, **kwargs)
