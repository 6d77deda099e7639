"""Checkpoint state as safetensors + JSON, never pickles.

Optimiser states (any ``torch.optim`` optimiser, bitsandbytes' 8-bit AdamW included: their state is tensors and
numbers), LR-scheduler and gradient-scaler states (numbers) and every RNG state (torch CPU and CUDA, Python's
``random``, NumPy) are split into a tensor file and a JSON file. A checkpoint folder that holds a pickle is refused
before anything is read (:func:`refuse_pickles`): unpickling a file someone shared can run arbitrary code.
"""

from __future__ import annotations

import json
import os
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from comfyui_std.core.errors import STDInputError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


@contextmanager
def atomic_file(path: Path):
    """The one way the trainer writes a file: the block writes the temporary name it is given, which is renamed to
    ``path`` when the block completes; on any error it is removed and ``path`` keeps what it held."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, allow_nan=False))


def read_json(path: Path, what: str = "resume") -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise STDInputError(what, f"{path} is not a readable JSON file ({err})") from None


def refuse_pickles(folder: Path) -> None:
    found = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if found:
        raise STDInputError("resume", f"{folder} holds {found[0].relative_to(folder)}, a pickle: unpickling can run "
                                      "arbitrary code, so this trainer never loads one. Its checkpoints hold "
                                      "safetensors and JSON only; resume from one of those, or start anew")


def _split(value, prefix: str, tensors: dict):
    """JSON-able structure with tensors replaced by {"__tensor__": key}."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[_split(k, f"{prefix}.k{i}", tensors), _split(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return {"__list__" if isinstance(value, list) else "__tuple__":
                [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state: cannot store a {type(value).__name__} without pickling")


def _join(value, tensors: dict):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {_join(k, tensors): _join(v, tensors) for k, v in value["__dict__"]}
        if "__list__" in value:
            return [_join(v, tensors) for v in value["__list__"]]
        if "__tuple__" in value:
            return tuple(_join(v, tensors) for v in value["__tuple__"])
    return value


def save_states(folder: Path, stem: str, states: dict) -> None:
    """Write nested state dicts (tensors, numbers, strings, lists, dicts) as ``stem.safetensors`` + ``stem.json``."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _split(states, "s", tensors)
    save_file(tensors, str(folder / f"{stem}.safetensors"))
    write_json(folder / f"{stem}.json", structure)


def load_states(folder: Path, stem: str) -> dict:
    for suffix in (".json", ".safetensors"):
        if not (folder / f"{stem}{suffix}").is_file():
            raise STDInputError("resume", f"{folder} is missing {stem}{suffix}")
    try:
        tensors = load_file(str(folder / f"{stem}.safetensors"))
    except Exception as err:  # corrupt file: safetensors raises several types
        raise STDInputError("resume", f"{folder / stem}.safetensors is not readable ({err})") from None
    return _join(read_json(folder / f"{stem}.json"), tensors)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
