"""Offline trajectory bank: precompute whole teacher trajectories for a dataset, then train from them.

    python -m training.bank build --preset tiny --data photos/ --output out/ [--bank-dir out/trajectories] [--draws K]
    python -m training.std ... --bank-source out/trajectories

``build`` runs the STD method's own teacher (:meth:`STDMethod.fresh_start` and :meth:`STDMethod.teacher_step`: base +
merged style LoRAs, CFG'd DDIM with w ~ U[w_min, w_max]) from ``n0 = ceil(50 η)`` down to grid index 1 for every
training item, ``K`` times with different noise, crops and w, and stores each trajectory with its context in one fp16
safetensors shard (``traj-<item>-<k>.safetensors``: ``state_<n>`` for every index, z0, text embeddings; caption, w
and the item's name in the header; the options in ``trajectories.json``). It is resumable (finished shards are
skipped; shards are written atomically), reproducible (each draw is seeded from the run seed, the item's name and
k), and splits the items across processes when launched with accelerate/torchrun. Training with ``--bank-source``
then draws (item, draw, index) and reads ``x_n`` and the teacher's ``x_{n-1}`` from the shards, so a step costs no
teacher call at all; it refuses trajectories built with other teacher settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from comfyui_std.core.errors import STDInputError, check_range
from training.common.config import method_options, option
from training.common.state import atomic_file, read_json, write_json
from training.std.offline_bank import INFO_FILE, TRAJECTORY_OPTIONS, shard_name
from training.std.method import PRESETS, STDConfig
from training.std.trajectory import LAST_INDEX

log = logging.getLogger("training")


@dataclasses.dataclass
class BuildConfig(STDConfig):
    bank_dir: str = option("", "Where to write the trajectories (default: OUTPUT/trajectories).", free=True)
    draws: int = option(1, "Trajectories per training item, each from its own noise, crop and guidance scale.")


def draw_seed(seed: int, item_key: str, draw: int) -> int:
    digest = hashlib.sha256(f"{seed}|{item_key}|{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


@torch.no_grad()
def build_trajectory(method, item_index: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """One whole teacher trajectory n0 -> LAST_INDEX for one item, with its context."""
    device = method.trainer.device
    bucket = method.buckets[item_index]
    row = method.fresh_start(item_index, gen, bucket)
    x, n = row["x"][None], method.n0
    ctx = {k: v[None] for k, v in row["ctx"].items()}
    w = torch.tensor([row["w"]], device=device)
    tensors = {f"state_{n}": row["x"], "z0": row["z0"], **row["ctx"]}
    while n > LAST_INDEX:
        x = method.teacher_step(x, torch.tensor([n], device=device), ctx, w)
        n -= 1
        tensors[f"state_{n}"] = x[0]
    meta = {"caption": row["caption"], "w": json.dumps(row["w"]), "start_index": json.dumps(method.n0),
            "item": method.item_key(item_index)}
    return tensors, meta


def build(cfg: BuildConfig, trainer) -> int:
    """Write the missing trajectories of this process's share of the items; returns how many were written."""
    from std_hf.weights import writable_folder

    check_range("draws", cfg.draws, 1, 10_000, kind=int)
    cfg.num_previews = 0  # no item is held out: a training run may train on any of them
    method = trainer.method
    method.setup()
    folder = writable_folder(cfg.bank_dir or Path(cfg.output) / "trajectories", "bank_dir")
    info = folder / INFO_FILE
    options = {k: v for k, v in method_options(cfg).items() if k in TRAJECTORY_OPTIONS}
    if info.exists():
        built = read_json(info, "bank_dir").get("options", {})
        diff = [f"{k} {built.get(k)!r} -> {v!r}" for k, v in options.items() if built.get(k) != v]
        if diff:
            raise STDInputError("bank_dir", f"{folder} holds trajectories built with other settings: "
                                            f"{'; '.join(diff)}; use another --bank-dir")
    elif trainer.is_main:
        write_json(info, {"options": options, "draws": cfg.draws})
    mine = range(trainer.rank, len(method.items), trainer.world)
    written = 0
    from tqdm.auto import tqdm
    for i in tqdm(mine, disable=not trainer.is_main, desc="trajectories"):
        key = method.item_key(i)
        for k in range(cfg.draws):
            dst = folder / shard_name(key, k)
            if dst.exists():
                continue  # resumable
            gen = torch.Generator().manual_seed(draw_seed(cfg.seed, key, k))
            tensors, meta = build_trajectory(method, i, gen)
            with atomic_file(dst) as tmp:
                save_file({k2: v.detach().to("cpu", torch.float16).contiguous() for k2, v in tensors.items()},
                          str(tmp), metadata=meta)
            written += 1
    trainer.accelerator.wait_for_everyone()
    return written


def main(argv=None) -> int:
    from training.common.cli import fail, guarded, setup_logging
    from training.common.config import config_from_argv
    from training.common.trainer import Trainer
    from training.std.method import STDMethod

    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "build":
        print("usage: python -m training.bank build [options]  (see --help after 'build')", file=sys.stderr)
        return fail("the first argument must be 'build'")

    where: dict[str, Path] = {}

    def run() -> int:
        cfg = config_from_argv(BuildConfig, PRESETS, argv[1:], "python -m training.bank build",
                               "Precompute whole teacher trajectories for a dataset (resumable; one shard per item "
                               "and draw).")
        where["log"] = Path(cfg.output).expanduser() / "train.log"
        trainer = Trainer(cfg, STDMethod)
        n = build(cfg, trainer)
        log.info("wrote %d trajectories", n)
        return 0

    return guarded(run, log_file=lambda: where.get("log"))


if __name__ == "__main__":
    sys.exit(main())
