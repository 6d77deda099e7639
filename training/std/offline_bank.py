"""Offline trajectories for STD: whole teacher trajectories precomputed by ``python -m training.bank build``, one fp16
safetensors shard per (item, draw), read memory-mapped (:class:`OfflineTrajectories`); a run trains from them with
``--bank-source`` instead of the online bank (:mod:`training.std.trajectory_bank`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import safe_open

from comfyui_std.core.errors import STDInputError

#: options a trajectory folder must share with the run that trains from it (they decide the teacher's states)
TRAJECTORY_OPTIONS = ("base", "data", "style_lora", "style_lora_scale", "style_prompt", "style_image", "ip_adapter",
                      "image_encoder", "ip_preset", "ip_weight", "start_strength", "resolution", "aspect_buckets",
                      "w_min", "w_max", "video", "num_frames", "frame_stride", "motion_adapter", "cache_latents")
INFO_FILE = "trajectories.json"


def shard_name(item_key: str, draw: int) -> str:
    return f"traj-{hashlib.sha1(item_key.encode()).hexdigest()[:16]}-{draw:03d}.safetensors"


class OfflineTrajectories:
    """Read-only access to a folder written by ``python -m training.bank build`` (memory-mapped shards)."""

    def __init__(self, folder: str | os.PathLike):

        self.folder = Path(folder).expanduser()
        info = self.folder / INFO_FILE
        if not info.is_file():
            raise STDInputError("bank_source", f"{self.folder} holds no trajectories ({INFO_FILE} is missing); run "
                                               "python -m training.bank build first")
        try:
            self.info = json.loads(info.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise STDInputError("bank_source", f"{info} is not readable ({err})") from None
        self.by_item: dict[str, list[Path]] = {}
        for p in sorted(self.folder.glob("traj-*.safetensors")):
            with safe_open(str(p), "pt") as f:
                item = (f.metadata() or {}).get("item")
            if item:
                self.by_item.setdefault(item, []).append(p)
        if not self.by_item:
            raise STDInputError("bank_source", f"no trajectories in {self.folder}; run python -m training.bank build "
                                               "first")

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_item.values())

    def check(self, options: dict, items: list[str]) -> None:
        """Refuse trajectories built with other teacher settings, or missing for some training items."""

        built = self.info.get("options", {})
        diff = [f"{k} {built.get(k)!r} -> {options.get(k)!r}" for k in TRAJECTORY_OPTIONS
                if k in options and built.get(k) != options.get(k)]
        if diff:
            raise STDInputError("bank_source", f"{self.folder} was built with other settings: {'; '.join(diff)}; "
                                               "rebuild it with the options of this run")
        missing = [i for i in items if i not in self.by_item]
        if missing:
            raise STDInputError("bank_source", f"{len(missing)} of {len(items)} training items have no trajectory in "
                                               f"{self.folder} (e.g. {missing[0]}); run python -m training.bank build "
                                               "with the same --data")

    def pair(self, item: str, draw: int, index: int, device) -> dict:
        """x_n, the teacher's x_{n-1}, z0 and the context of one trajectory at grid index ``index``."""
        shards = self.by_item[item]
        with safe_open(str(shards[draw % len(shards)]), "pt") as f:
            meta = f.metadata()
            out = {"x": f.get_tensor(f"state_{index}").float().to(device),
                   "x_prev": f.get_tensor(f"state_{index - 1}").float().to(device),
                   "z0": f.get_tensor("z0").float().to(device)}
            ctx = {k: f.get_tensor(k).float().to(device) for k in f.keys() if not k.startswith("state_") and k != "z0"}
        return {**out, "ctx": ctx, "caption": meta["caption"], "w": json.loads(meta["w"]),
                "start_index": json.loads(meta["start_index"])}

    def draws(self, item: str) -> int:
        return len(self.by_item[item])
