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


def test_std_run_with_the_adversarial_loss(tmp_path):
    from training.std.__main__ import main as cli

    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
    out = tmp_path / "out"
    assert cli(["--preset", "tiny", "--data", str(tmp_path), "--output", str(out), "--adversarial", "true",
                "--max-steps", "2", "--num-previews", "0"]) == 0
    from safetensors.torch import load_file
    from training.common.trainer import checkpoints
    sd = load_file(str(checkpoints(out / "checkpoints")[-1] / "trainable.safetensors"))
    assert any(k.startswith("adv.disc.heads.0.") for k in sd)
