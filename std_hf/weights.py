"""Strict, counted loading of module weights from safetensors files (single files or diffusers folders).

A module is built on the meta device (no random initialisation, no memory), every tensor it needs is looked up in
the file through a name map, checked for shape, converted to the requested dtype and assigned. Nothing is filled
silently: a tensor the module needs and the file lacks, a tensor of the component the module has no place for, or a
shape that differs is an error naming the component and the key. :class:`ComponentReport` carries the counts
``python -m training.check_base`` prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from comfyui_std.core.errors import STDInputError


@dataclass
class ComponentReport:
    """What loading one component found: ``loaded`` of ``needed`` tensors, and any problems."""

    name: str
    needed: int = 0
    loaded: int = 0
    missing: list[str] = field(default_factory=list)      # "module key <- file key" lines
    unexpected: list[str] = field(default_factory=list)   # file keys of the component with no place in the module
    mismatched: list[str] = field(default_factory=list)   # "key: file shape vs module shape"
    ignored: dict[str, str] = field(default_factory=dict)  # file key -> why it is not loaded
    dtype: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched) and self.loaded == self.needed

    def line(self) -> str:
        text = f"{self.name}: loaded {self.loaded} / {self.needed} tensors"
        if self.dtype:
            text += f" ({self.dtype} in the file)"
        if self.ignored:
            reasons = sorted(set(self.ignored.values()))
            text += f"; {len(self.ignored)} not used ({'; '.join(reasons)})"
        return text

    def problems(self) -> list[str]:
        out = [f"{self.name}: missing tensor {m}" for m in self.missing]
        out += [f"{self.name}: unexpected tensor {u} (no place for it in the {self.name})" for u in self.unexpected]
        out += [f"{self.name}: tensor {m}" for m in self.mismatched]
        return out

    def raise_if_short(self, source: str, label: str = "base model") -> None:
        """An :class:`STDInputError` of ``label`` naming the file and the first problems, unless all is loaded."""
        if not self.ok:
            found = self.problems()
            more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
            raise STDInputError(label, f"'{source}': {'; '.join(found[:3])}{more}")


class TensorSource:
    """Read-only access to the tensors of one or more .safetensors files (memory-mapped, read on demand)."""

    def __init__(self, files: list[Path], label: str = "base model"):
        from safetensors import safe_open

        self.label = label
        self.name = ", ".join(Path(p).name for p in files)
        self._handles = []
        self._where: dict[str, object] = {}
        for path in files:
            try:
                h = safe_open(str(path), framework="pt")
                keys = list(h.keys())
                metadata = h.metadata() or {}
            except Exception as err:  # corrupt header: safetensors raises several types
                raise STDInputError(label, f"'{Path(path).name}' is not a readable .safetensors file ({err})") from None
            self._handles.append(h)
            for k in keys:
                self._where[k] = h
            self.metadata = dict(metadata)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return str(self._where[key].get_slice(key).get_dtype())

    def tensor(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def shapes(self, prefix: str = "") -> dict[str, torch.Size]:
        """{key: shape} of every tensor under ``prefix`` (header only, no data read)."""
        return {k: torch.Size(self.shape(k)) for k in self._where if k.startswith(prefix)}

    def meta_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Meta-device stand-ins (right shapes, no data) for config derivation from shapes."""
        return {k: torch.empty(s, device="meta") for k, s in self.shapes(prefix).items()}


#: one entry per module tensor: (file key, transform of the file tensor, transform of the file shape)
Mapping = dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]]


def build_on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.device("meta"):
        return factory()


def check(module: torch.nn.Module, mapping: Mapping, source: TensorSource, name: str,
          component_keys: set[str], ignorable: dict[str, str] | None = None) -> ComponentReport:
    """Count what ``module`` would get from ``source`` through ``mapping`` (header only: nothing is read)."""
    state = module.state_dict()
    report = ComponentReport(name, needed=len(state))
    used = set()
    dtypes = set()
    for key, like in state.items():
        file_key, transform = mapping[key]
        if file_key not in source:
            report.missing.append(f"{key} (file key {file_key})")
            continue
        used.add(file_key)
        dtypes.add(source.dtype(file_key))
        shape = source.shape(file_key)
        if transform is not None:
            shape = tuple(transform(torch.empty(shape, device="meta")).shape)
        if tuple(shape) != tuple(like.shape):
            report.mismatched.append(f"{file_key}: shape {tuple(shape)} in the file, the {name} needs "
                                     f"{tuple(like.shape)}")
            continue
        report.loaded += 1
    for k in sorted(component_keys - used):
        reason = next((why for tail, why in (ignorable or {}).items() if k.endswith(tail)), None)
        if reason is not None:
            report.ignored[k] = reason
        else:
            report.unexpected.append(k)
    report.dtype = "/".join(sorted(d.lower() for d in dtypes))
    return report


def materialize(module: torch.nn.Module, mapping: Mapping, source: TensorSource, dtype: torch.dtype,
                report: ComponentReport) -> torch.nn.Module:
    """Fill a meta-device module from ``source`` (after :func:`check` found nothing short)."""
    report.raise_if_short(source.name, source.label)
    tensors = {}
    for key, like in module.state_dict().items():
        file_key, transform = mapping[key]
        t = source.tensor(file_key)
        if transform is not None:
            t = transform(t)
        target = dtype if t.is_floating_point() else t.dtype
        tensors[key] = t.to(target).contiguous()
    persistent = set(tensors)
    buffers = {n: b for n, b in module.named_buffers() if n not in persistent}
    module.load_state_dict(tensors, strict=True, assign=True)
    for name, buf in buffers.items():  # non-persistent buffers are not in files: rebuild the known ones
        if name.endswith("position_ids"):
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            setattr(owner, name.rsplit(".", 1)[-1], torch.arange(buf.shape[-1]).expand(buf.shape).clone())
        else:
            raise STDInputError("base model", f"internal: {report.name} has an unknown non-persistent buffer {name}")
    leftovers = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftovers:
        raise STDInputError("base model", f"internal: {report.name} tensors were not filled: {leftovers[:3]}")
    return module.eval()


def folder_weights(folder: Path, label: str) -> list[Path]:
    """The .safetensors weight files of one diffusers/transformers component folder (one file or shards)."""
    files = sorted(p for p in folder.glob("*.safetensors"))
    plain = [p for p in files if p.name.count(".") == 1]  # model.safetensors, not model.fp16.safetensors
    shards = [p for p in plain if "-of-" in p.name]
    chosen = shards or plain[:1] or [p for p in files if ".fp16." in p.name][:1]
    if not chosen:
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".pth"))
        why = (f" (only {', '.join(other)}: pickled weights can run code when loaded and are not read)" if other
               else "")
        raise STDInputError(label, f"{folder} holds no .safetensors weights{why}")
    return chosen


def writable_folder(path: str | os.PathLike, name: str) -> Path:
    """``path`` as a folder this process can write into (created if missing), else a clear error."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise STDInputError(name, f"{p} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise STDInputError(name, f"cannot write into {p} ({err.strerror or type(err).__name__})") from None
    return p
