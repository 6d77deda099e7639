"""The asymmetric adversarial loss: gradient routing (no leak into D from the generator term), hinge values,
r < s, the gradient penalty, a discriminator that learns, state round trip, bad input; and an STD run with it on."""

import numpy as np
import pytest
import torch
from PIL import Image

from training.std.adversarial import AdversarialLoss, DinoFeatures, build_adversarial, tiny_dino


@pytest.fixture()
def adv():
    torch.manual_seed(0)
    return build_adversarial("tiny", [0, 1], cond_dim=8, gp_weight=1e-2)


def _imgs(n=4, seed=0, smooth=False):
    g = torch.Generator().manual_seed(seed)
    if smooth:
        base = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
        return torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear", align_corners=False)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


def test_generator_term_reaches_the_fake_images_and_never_the_discriminator(adv):
    fake = _imgs().requires_grad_(True)
    cond = torch.randn(4, 8)
    adv.generator_loss(fake, cond, torch.Generator().manual_seed(1)).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in adv.trainable_parameters())
    assert all(p.requires_grad for p in adv.trainable_parameters())  # restored after the G term
    assert all(p.grad is None for p in adv.features.parameters())


def test_discriminator_loss_trains_only_the_heads(adv):
    real, fake = _imgs(seed=1).requires_grad_(True), _imgs(seed=2).requires_grad_(True)
    loss, logs = adv.discriminator_loss(real, fake, torch.randn(4, 8), torch.Generator().manual_seed(0))
    loss.backward()
    assert real.grad is None and fake.grad is None
    assert all(p.grad is not None for p in adv.trainable_parameters())
    assert all(p.grad is None for p in adv.features.parameters())
    assert np.isfinite(logs["adv/gp"]) and logs["adv/gp"] > 0


def test_hinge_and_gradient_penalty_values(adv, monkeypatch):
    real, fake, cond = _imgs(seed=1), _imgs(seed=2), torch.randn(4, 8)
    logits = iter([torch.full((4, 3), 0.5), torch.full((4, 3), -2.0)])
    adv.gp_weight = 0.0
    monkeypatch.setattr(adv.disc, "forward", lambda f, c: next(logits))
    loss, _ = adv.discriminator_loss(real, fake, cond)
    assert loss.item() == pytest.approx(0.5 + 0.0)  # relu(1 - 0.5) + relu(1 - 2)
    monkeypatch.undo()
    adv.gp_weight = 1.0
    with_gp, _ = adv.discriminator_loss(real, fake, cond, torch.Generator().manual_seed(0))
    adv.gp_weight = 0.0
    without, _ = adv.discriminator_loss(real, fake, cond, torch.Generator().manual_seed(0))
    assert with_gp > without


def test_dino_sees_224_px_with_the_official_random_crop_whatever_its_config_says():
    """Bug caught: the input size taken from the model config (the Hub's DINOv2 says 518: 1369 tokens, and a 512-px
    image is never cropped), or a crop that is never (or always) taken."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                     image_size=518, patch_size=14))
    features = DinoFeatures(model, hooks=[0, 1])
    images = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokens = features(images, torch.Generator().manual_seed(0))
    assert [tuple(t.shape) for t in tokens] == [(2, 256, 32)] * 2  # (224 / 14)² patches
    plain = DinoFeatures(model, hooks=[0, 1], augment=False).preprocess(images)
    resized = (torch.nn.functional.interpolate((images + 1) / 2, size=(224, 224), mode="area") -
               plain.new_tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)) / plain.new_tensor(
        (0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    assert torch.allclose(plain, resized, atol=1e-6)  # no augmentation: the whole image, area-resized
    taken = sum(_crop_drawn(seed) for seed in range(40))
    assert 10 <= taken <= 30, taken  # p = 0.5


def _crop_drawn(seed: int) -> bool:
    """Whether preprocess took the random crop for this seed (augmentation off except the crop): on a horizontal
    ramp over 512 columns, the whole image spans the ramp's full range after the resize, a 224-px crop 224/512 of
    it."""
    import training.std.adversarial as adversarial

    features = DinoFeatures(tiny_dino(), hooks=[0], augment=True, crop_p=0.5)
    image = torch.linspace(-1, 1, 512).view(1, 1, 1, 512).expand(1, 3, 512, 512).contiguous()
    real = adversarial.diff_augment
    adversarial.diff_augment = lambda x, g: x
    try:
        x = features.preprocess(image, torch.Generator().manual_seed(seed))
    finally:
        adversarial.diff_augment = real
    assert x.shape[-2:] == (224, 224)
    span = float(x[0, 0, 0, -1] - x[0, 0, 0, 0]) * 0.229  # back to [0, 1] units: ~1 whole, ~0.44 a crop
    assert span > 0.4
    return span < 0.7


def test_real_level_is_always_below_the_students_level():
    g = torch.Generator().manual_seed(0)
    draws = [AdversarialLoss.asymmetric_real_level(s, g) for s in (1, 5, 379, 739) for _ in range(200)]
    assert all(r >= 0 for r in draws)
    assert max(AdversarialLoss.asymmetric_real_level(379, g) for _ in range(500)) < 379
    assert AdversarialLoss.asymmetric_real_level(0, g) == 0
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [AdversarialLoss.asymmetric_real_level(500, g1) for _ in range(5)] == \
        [AdversarialLoss.asymmetric_real_level(500, g2) for _ in range(5)]


def test_discriminator_learns_to_separate_real_from_fake(adv):
    """Real = left-to-right ramps, fake = right-to-left ramps (a spatial difference that per-batch normalisation
    cannot remove); a seeded run of 60 Adam steps must open a clear margin between the two. Augmentation is off
    here so the margin is measured on the inputs themselves."""
    adv.features.augment = False
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(8, 3, 32, 32)
    real = (ramp + 0.1 * torch.randn(8, 3, 32, 32, generator=g)).clamp(-1, 1)
    fake = (-ramp + 0.1 * torch.randn(8, 3, 32, 32, generator=g)).clamp(-1, 1)
    cond = torch.zeros(8, 8)
    opt = torch.optim.Adam(adv.trainable_parameters(), lr=2e-3)
    losses, margins = [], []
    for i in range(60):
        loss, logs = adv.discriminator_loss(real, fake, cond, torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        margins.append(logs["adv/d_real"] - logs["adv/d_fake"])
    assert np.mean(margins[-5:]) > 0.1 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1


def test_state_round_trip_and_bad_input(adv):
    adv.steps += 7
    clone = build_adversarial("tiny", [0, 1], cond_dim=8)
    clone.load_state_dict(adv.state_dict())
    assert int(clone.steps) == 7 and not any(k.startswith("features.") for k in adv.state_dict())
    for a, b in zip(adv.trainable_parameters(), clone.trainable_parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="expected images"):
        adv.generator_loss(torch.rand(4, 32, 32), torch.randn(4, 8))
    with pytest.raises(ValueError, match="cond"):
        adv.generator_loss(_imgs(), torch.randn(4, 5))
    with pytest.raises(ValueError, match="dino_hooks"):
        DinoFeatures(tiny_dino(2), hooks=[0, 5])
    with pytest.raises(ValueError, match="dino: could not load DINOv2"):
        build_adversarial("/nonexistent/dinov2", [2, 5, 8, 11], 8)


@pytest.mark.bad_input
@pytest.mark.parametrize("change, message", [
    ("rename", r"1 missing \(e.g. disc.heads.1.cmap.weight\); 1 unexpected \(e.g. disc.heads.1.cmap_old.weight\)"),
    ("drop", r"1 missing \(e.g. gp_scale\)"),
    ("reshape", r"1 of another shape \(e.g. disc.heads.0.cmap.bias \(3,\) vs \(64,\)\)"),
])
def test_a_discriminator_state_that_does_not_match_is_refused_naming_the_key(adv, change, message):
    sd = adv.state_dict()
    if change == "rename":
        sd["disc.heads.1.cmap_old.weight"] = sd.pop("disc.heads.1.cmap.weight")
    elif change == "drop":
        del sd["gp_scale"]
    else:
        sd["disc.heads.0.cmap.bias"] = torch.zeros(3)
    clone = build_adversarial("tiny", [0, 1], cond_dim=8, seed=5)
    before = {k: v.clone() for k, v in clone.state_dict().items()}
    with pytest.raises(ValueError, match=r"^resume: the checkpoint's discriminator does not match this run's: " +
                       message):
        clone.load_state_dict(sd)
    assert all(torch.equal(before[k], v) for k, v in clone.state_dict().items())  # nothing half-loaded


@pytest.mark.bad_input
@pytest.mark.parametrize("change, message", [
    ("extra", "1 tensors a DINOv2 has no place for (e.g. extra_head.weight)"),
    ("drop", "1 weights it lacks (e.g. layernorm.bias)"),
])
def test_a_dinov2_folder_with_foreign_or_missing_weights_is_refused(tmp_path, change, message):
    from safetensors.torch import load_file, save_file

    from training.std.adversarial import load_dino

    tiny_dino(2).save_pretrained(tmp_path)
    assert load_dino(str(tmp_path)).config.num_hidden_layers == 2
    sd = load_file(str(tmp_path / "model.safetensors"))
    if change == "extra":
        sd["extra_head.weight"] = torch.zeros(2, 2)
    else:
        del sd["layernorm.bias"]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="^dino: "):
        load_dino(str(tmp_path))
    try:
        load_dino(str(tmp_path))
    except ValueError as err:
        assert str(err) == f"dino: '{tmp_path}' is not a complete DINOv2 model: {message}"


def test_std_run_with_the_adversarial_loss(tmp_path, capsys):
    from training.std.__main__ import main as cli

    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
    out = tmp_path / "out"
    assert cli(["--preset", "tiny", "--data", str(tmp_path), "--output", str(out), "--adversarial", "true",
                "--max-steps", "2", "--num-previews", "0"]) == 0
    from safetensors.torch import load_file
    from training.common.trainer import checkpoints
    path = checkpoints(out / "checkpoints")[-1] / "trainable.safetensors"
    sd = load_file(str(path))
    assert any(k.startswith("adv.disc.heads.0.") for k in sd)
    # a checkpoint whose discriminator head was renamed is refused, not resumed with a random head
    from safetensors.torch import save_file
    sd["adv.disc.heads.0.cmap_v1.weight"] = sd.pop("adv.disc.heads.0.cmap.weight")
    save_file(sd, str(path))
    capsys.readouterr()
    assert cli(["--preset", "tiny", "--data", str(tmp_path), "--output", str(out), "--adversarial", "true",
                "--max-steps", "3", "--num-previews", "0", "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: resume: the checkpoint's discriminator does not match this run's: 1 missing "
                          "(e.g. disc.heads.0.cmap.weight); 1 unexpected (e.g. disc.heads.0.cmap_v1.weight)"), err
