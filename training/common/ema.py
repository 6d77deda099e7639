"""EMA copies of trained tensors, shared by the methods (STD's EMA target, SiD-LSG's exported generator)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def ema_copy(named) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in named}


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], named, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * current, for every (name, parameter)."""
    for n, p in named:
        ema[n].lerp_(p.detach(), 1 - decay)


@contextmanager
def swapped(named, values: dict[str, torch.Tensor] | None):
    """Inside the block the parameters hold ``values`` (e.g. their EMA); afterwards their own weights again.
    ``values=None`` leaves them as they are."""
    if values is None:
        yield
        return
    named = list(named)
    saved = ema_copy(named)
    with torch.no_grad():
        for n, p in named:
            p.copy_(values[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in named:
                p.copy_(saved[n])
