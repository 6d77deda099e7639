"""Offline trajectory bank: precompute whole teacher trajectories for a dataset, then train from them.

    python -m training.bank build --preset tiny --data photos/ --output out/ [--bank-dir out/trajectories]
    python -m training.std ... --bank-source out/trajectories

``build`` runs the same teacher as ``training.std`` (base + merged style LoRAs, CFG'd DDIM with w ~ U[w_min, w_max])
from ``n0 = ceil(50 η)`` down to grid index 1 for every training item and stores each trajectory with its context in
one fp16 safetensors shard (``traj-<item>.safetensors``: ``state_<n>`` for every index, z0, text embeddings; caption
and w in the header). It is resumable (finished shards are skipped; shards are written atomically) and splits the
items across processes when launched with accelerate/torchrun. Training with ``--bank-source`` then draws (item,
index) pairs and reads ``x_n`` and the teacher's ``x_{n-1}`` from the shards, so a step costs no teacher call at all.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training.std.trajectory import LAST_INDEX, cfg_lcm, jump, x0_eps

log = logging.getLogger("training")


def shard_name(item_path: Path) -> str:
    import hashlib
    return "traj-" + hashlib.sha1(str(item_path).encode()).hexdigest()[:16] + ".safetensors"


@torch.no_grad()
def build_trajectory(method, item_index: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """One whole teacher trajectory n0 -> LAST_INDEX for one item, with its context."""
    device = method.trainer.device
    item = method.items[item_index]
    z0 = method.encode_latent(item_index, gen)
    ctx = method.text_context(item.caption)
    w = float(method.cfg.w_min + (method.cfg.w_max - method.cfg.w_min) * torch.rand((), generator=gen))
    noise = torch.randn(z0.shape, generator=gen).to(device)
    n = method.n0
    idx = torch.tensor([n], device=device)
    x = (method.grid.alpha(idx).sqrt() * z0 + (1 - method.grid.alpha(idx)).sqrt() * noise)[None]
    batch_ctx = {k: v[None] for k, v in ctx.items()}
    tensors = {f"state_{n}": x[0], "z0": z0, **ctx}
    pt = method.base.prediction_type
    with method.teacher():
        while n > LAST_INDEX:
            idx = torch.tensor([n], device=device)
            cond = x0_eps(method.unet(x, idx, batch_ctx), x, method.grid.alpha(idx), pt)
            unc = x0_eps(method.unet(x, idx, method.uncond(1), uncond=True), x, method.grid.alpha(idx), pt)
            x0_t, eps_t = cfg_lcm(cond, unc, torch.tensor([w], device=device))
            x = jump(x0_t, eps_t, method.grid.alpha_prev(idx))
            n -= 1
            tensors[f"state_{n}"] = x[0]
    meta = {"caption": item.caption, "w": json.dumps(w), "start_index": json.dumps(method.n0),
            "item": item.path.name}
    return tensors, meta


class OfflineTrajectories:
    """Read-only access to a folder written by ``build`` (memory-mapped shards)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.shards = sorted(self.folder.glob("traj-*.safetensors"))
        if not self.shards:
            raise FileNotFoundError(f"bank_source: no trajectories in {self.folder}; run python -m training.bank "
                                    "build first")

    def __len__(self) -> int:
        return len(self.shards)

    def pair(self, shard: int, index: int, device) -> dict:
        """x_n, the teacher's x_{n-1}, z0 and the context of one trajectory at grid index ``index``."""
        with safe_open(str(self.shards[shard]), "pt") as f:
            meta = f.metadata()
            out = {"x": f.get_tensor(f"state_{index}").float().to(device),
                   "x_prev": f.get_tensor(f"state_{index - 1}").float().to(device),
                   "z0": f.get_tensor("z0").float().to(device)}
            ctx = {k: f.get_tensor(k).float().to(device) for k in f.keys() if not k.startswith("state_") and k != "z0"}
        return {**out, "ctx": ctx, "caption": meta["caption"], "w": json.loads(meta["w"]),
                "start_index": json.loads(meta["start_index"])}


def build(cfg, trainer) -> int:
    """Write the missing trajectories of this process's share of the items; returns how many were written."""
    method = trainer.method
    method.setup()
    folder = Path(cfg.bank_dir or Path(cfg.output) / "trajectories")
    folder.mkdir(parents=True, exist_ok=True)
    mine = range(trainer.rank, len(method.items), trainer.world)
    written = 0
    from tqdm.auto import tqdm
    for i in tqdm(mine, disable=not trainer.is_main, desc="trajectories"):
        dst = folder / shard_name(method.items[i].path)
        if dst.exists():
            continue  # resumable
        tensors, meta = build_trajectory(method, i, trainer.generator(i, salt=17))
        tmp = dst.with_name(dst.name + ".tmp")
        save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=meta)
        os.replace(tmp, dst)
        written += 1
    trainer.accelerator.wait_for_everyone()
    return written


def main(argv=None) -> int:
    from training.common.config import config_from_argv, option
    from training.common.trainer import Trainer
    from training.std.method import PRESETS, STDConfig, STDMethod
    import dataclasses

    @dataclasses.dataclass
    class BuildConfig(STDConfig):
        bank_dir: str = option("", "Where to write the trajectories (default: OUTPUT/trajectories).")

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "build":
        print("usage: python -m training.bank build [options]  (see --help after 'build')", file=sys.stderr)
        return 2
    try:
        cfg = config_from_argv(BuildConfig, PRESETS, argv[1:], "python -m training.bank build",
                               "Precompute whole teacher trajectories for a dataset (resumable; one shard per item).")
        trainer = Trainer(cfg, STDMethod)
        n = build(cfg, trainer)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("wrote %d trajectories", n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
