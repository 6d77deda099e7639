"""The online trajectory bank of STD (docs/official-std-code.md §3, with the official code's bugs fixed).
 Each entry is one teacher
trajectory in progress: its current state ``x_n`` and grid index ``n`` *together with the whole context it was
started from* (clean latent z0, text embeddings, pooled embeddings / time ids, caption, guidance scale w), so a
restored state is always trained with its own prompt. A batch draws, per sample with probability ρ, an entry
uniformly among the filled ones of its bucket that this batch has not drawn yet (no entry twice in one batch, no
contiguity assumption), from a seeded generator whose state is checkpointed. An entry advances one teacher step per
visit and retires when its index reaches :data:`~training.std.trajectory.LAST_INDEX`; fresh trajectories are added
while their bucket has room. Capacity counts per bucket (the ``group`` of an entry's meta): a batch draws only from
its own bucket, so with one shared capacity most buckets would find their pool empty and restart at the start
index far more often than the method's 1 - ρ (about 40 % of steps with 4 buckets, 65 % with 8, at capacity 4);
per bucket the share is 1 - ρ whatever the number of buckets (tested). Entry keys and shard names are counters, so two runs with the same seed make the same bank.

Tensors live on disk as fp16 safetensors, one shard per entry version, read back memory-mapped, so RAM stays flat
however large the bank is. The bank is saved into and restored from training checkpoints (``save_to``/``load_from``).

The offline alternative (whole trajectories precomputed by ``python -m training.bank build``) is
:mod:`training.std.offline_bank`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_std.core.errors import check_range
from training.common.errors import TrainingUserError
from training.common.state import atomic_file

INDEX_FILE = "bank.json"


class BankDiskFullError(TrainingUserError, RuntimeError):
    """Not enough free disk space for the trajectory bank."""


@dataclass
class BankEntry:
    key: str
    index: int                      # grid index n of ``state``
    caption: str
    w: float | None
    file: str                       # shard holding "state" and the context tensors
    meta: dict = field(default_factory=dict)

    def tensors(self, root: Path, device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
        out = {}
        with safe_open(str(root / self.file), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        return out


class TrajectoryBank:
    """Teacher-trajectory states with their context.

    Args:
        root: working folder for the shards (created; one per rank).
        capacity: number of trajectories kept at once per bucket (the official code, which has one bucket,
            hard-codes 4).
        rho: probability of training on a bank state instead of a fresh start (official 0.8).
        seed: seed of the sampling generator (use a per-rank seed).
        min_free_bytes: refuse to write when the disk has less free space than this.
    """

    def __init__(self, root: str | os.PathLike, capacity: int = 4, rho: float = 0.8, seed: int = 0,
                 min_free_bytes: int = 64 * 2**20):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity = check_range("bank_size", capacity, 1, 10_000_000, kind=int)
        self.rho = check_range("rho", rho, 0.0, 1.0)
        self.min_free_bytes = int(min_free_bytes)
        self.entries: dict[str, BankEntry] = {}
        self.generator = torch.Generator().manual_seed(int(seed))
        self.stats = {"added": 0, "dropped": 0, "advanced": 0, "retired": 0, "drawn": 0, "fresh": 0}
        self.counter = 0  # entry keys and shard names (deterministic)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def full(self) -> bool:
        """Whether the bucket-less pool is full (see :meth:`full_for`)."""
        return self.full_for(None)

    def full_for(self, group=None) -> bool:
        """Whether ``group``'s bucket holds ``capacity`` trajectories (None: the entries without a bucket)."""
        key = None if group is None else _group(group)
        return sum(1 for e in self.entries.values() if e.meta.get("group") == key) >= self.capacity

    # -- sampling ------------------------------------------------------------------------------------------------
    def draw(self, group=None, exclude=()) -> BankEntry | None:
        """With probability ρ an entry uniformly among the filled ones (of ``group``, not in ``exclude``), else None."""
        u = torch.rand((), generator=self.generator).item()
        pool = sorted(k for k, e in self.entries.items() if k not in exclude and
                      (group is None or e.meta.get("group") == _group(group)))
        if pool and u < self.rho:
            k = int(torch.randint(len(pool), (), generator=self.generator))
            self.stats["drawn"] += 1
            return self.entries[pool[k]]
        self.stats["fresh"] += 1
        return None

    def draw_batch(self, n: int, group=None) -> list[BankEntry | None]:
        """One draw per sample of a batch; an entry is drawn at most once per batch (each advances once)."""
        out: list[BankEntry | None] = []
        for _ in range(n):
            e = self.draw(group, {x.key for x in out if x is not None})
            out.append(e)
        return out

    # -- updates -------------------------------------------------------------------------------------------------
    def _write(self, tensors: dict[str, torch.Tensor]) -> str:
        need = sum(t.numel() * 2 for t in tensors.values()) + self.min_free_bytes
        free = shutil.disk_usage(self.root).free
        if free < need:
            raise BankDiskFullError(f"trajectory bank: {free / 2**20:.0f} MiB free in {self.root}, need "
                                    f"{need / 2**20:.0f} MiB; free disk space, lower bank_size or move output")
        self.counter += 1
        name = f"shard-{self.counter:09d}.safetensors"
        half = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
                for k, v in tensors.items()}
        with atomic_file(self.root / name) as tmp:
            save_file(half, str(tmp))
        return name

    def _remove_file(self, name: str) -> None:
        try:
            (self.root / name).unlink()
        except FileNotFoundError:
            pass

    def put(self, index: int, state: torch.Tensor, context: dict[str, torch.Tensor], caption: str = "",
            w: float | None = None, meta: dict | None = None) -> BankEntry | None:
        """Start keeping a new trajectory at ``index`` (dropped, like the official bank, when its bucket is full)."""
        if self.full_for((meta or {}).get("group")):
            self.stats["dropped"] += 1
            return None
        if "state" in context:
            raise ValueError("context must not contain a tensor named 'state'")
        file = self._write({"state": state, **context})
        key = f"e{self.counter:09d}"
        meta = dict(meta or {})
        if "group" in meta:
            meta["group"] = _group(meta["group"])
        entry = BankEntry(key, int(index), caption, None if w is None else float(w), file, meta)
        self.entries[key] = entry
        self.stats["added"] += 1
        return entry

    def advance(self, entry: BankEntry, index: int, state: torch.Tensor) -> None:
        """Replace an entry's state by the teacher's next one (the context is carried over)."""
        tensors = entry.tensors(self.root, dtype=None)
        tensors["state"] = state
        old = entry.file
        entry.file = self._write(tensors)
        entry.index = int(index)
        self._remove_file(old)
        self.stats["advanced"] += 1

    def retire(self, entry: BankEntry) -> None:
        if self.entries.pop(entry.key, None) is not None:
            self._remove_file(entry.file)
            self.stats["retired"] += 1

    def step(self, entry: BankEntry | None, next_index: int, next_state: torch.Tensor, context=None, caption="",
             w=None, last_index: int = 1, meta: dict | None = None) -> None:
        """After one teacher step: advance a drawn entry (retire it at the end), or keep a fresh trajectory."""
        if next_index <= last_index:
            if entry is not None:
                self.retire(entry)
            return
        if entry is not None:
            self.advance(entry, next_index, next_state)
        else:
            self.put(next_index, next_state, context or {}, caption, w, meta)

    # -- persistence ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "rho": self.rho, "stats": dict(self.stats), "counter": self.counter,
                "generator": self.generator.get_state().tolist(),
                "entries": [{"key": e.key, "index": e.index, "caption": e.caption, "w": e.w, "file": e.file,
                             "meta": e.meta} for e in sorted(self.entries.values(), key=lambda e: e.key)]}

    def save_to(self, folder: str | os.PathLike) -> None:
        """Write the bank into a checkpoint folder (shards hard-linked when possible, else copied)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for e in self.entries.values():
            dst = folder / e.file
            if not dst.exists():
                try:
                    os.link(self.root / e.file, dst)
                except OSError:
                    shutil.copy2(self.root / e.file, dst)
        with atomic_file(folder / INDEX_FILE) as tmp:
            tmp.write_text(json.dumps(self.state_dict(), indent=1))

    def load_from(self, folder: str | os.PathLike) -> None:
        """Restore a bank saved by :meth:`save_to` (replacing the current contents)."""
        folder = Path(folder)
        state = json.loads((folder / INDEX_FILE).read_text())
        for e in list(self.entries.values()):
            self._remove_file(e.file)
        self.entries = {}
        for item in state["entries"]:
            src = folder / item["file"]
            if not src.exists():
                raise FileNotFoundError(f"trajectory bank: checkpoint is missing {src}")
            if not (self.root / item["file"]).exists():
                shutil.copy2(src, self.root / item["file"])
            self.entries[item["key"]] = BankEntry(item["key"], item["index"], item["caption"], item["w"],
                                                  item["file"], item.get("meta", {}))
        self.capacity, self.rho = state["capacity"], state["rho"]
        self.stats = dict(state["stats"])
        self.counter = int(state.get("counter", 0))
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))

    def clear_orphans(self) -> int:
        """Delete shards in the working folder that no entry refers to (left by an interrupted run)."""
        keep = {e.file for e in self.entries.values()}
        n = 0
        for p in self.root.glob("*.safetensors*"):
            if p.name not in keep:
                p.unlink()
                n += 1
        return n


def _group(group) -> str:
    """Bucket keys (h, w) as a JSON-stable string."""
    return group if isinstance(group, str) else "x".join(str(int(v)) for v in group)
