"""The memory plan: how a run fits the GPU it has, decided in one place for the app, the batch CLI and the streamed
video path.

From the device's free memory (or ``--vram-budget GiB``, which the tests and benches use on a CPU) and the sizes of
the loaded components, :func:`plan_memory` chooses

* the **VAE sub-batch**: frames per VAE encode or decode call, independent of ``frames_per_batch`` (the frames the
  sampler sees together). A VAE's peak memory grows linearly with the frames it codes at once; measured at real
  SDXL size (fp32, 1024x576): +2.25 GiB for one frame, +3.40 for two, +1.15 GiB a frame after that, so the default
  16-frame video block took about 19 GiB before the plan;
* **tiling**, when even one frame does not fit: the VAE then codes tiles of at most :data:`TILE_PIXELS` pixels a
  side, one frame at a time, at any frame size (diffusers' own tiling starts only above 1024 px for SDXL);
* **model placement**: ``none`` (every component on the GPU), ``model`` (each component moves to the GPU when it is
  used and back after, as diffusers' ``enable_model_cpu_offload``) or ``sequential`` (weights stream to the GPU
  layer by layer, as ``enable_sequential_cpu_offload``; the smallest cards). ``--offload auto`` takes the first that
  fits.

The activation figures are estimates calibrated on the real SDXL VAE and UNet architectures (see
``bench/real_size_memory.py``); they err on the large side. Sub-batching and offload change where and when work
happens, not what is computed: the outputs are the same (tested on the tiny models). Tiling blends overlapping
tiles, so its output differs slightly from an untiled decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from comfyui_std.core.errors import STDInputError, check_range

GIB = 1024 ** 3
OFFLOAD_MODES = ("auto", "none", "model", "sequential")
#: peak bytes of a VAE encode or decode per frame = VAE_FACTOR * pixels * channels of the full-resolution block *
#: bytes per value, counted (frames + 1) times (the first frame costs about double: buffers that do not grow with
#: the batch). Calibrated on the SDXL VAE in fp32 at 1024x576 (1.15 GiB a frame measured; this gives 1.27).
VAE_FACTOR = 4.5
#: peak activation bytes of a UNet call per latent pixel, per batch entry, per byte of the compute dtype
#: (SDXL at 1024², CFG batch 2, fp16: about 1.6 GiB)
UNET_FACTOR = 26_000
#: the side of a VAE tile in pixels when the plan tiles (one frame per call)
TILE_PIXELS = 512
#: kept free for the allocator's fragmentation and small buffers
HEADROOM = 0.10


def vae_frame_bytes(height: int, width: int, base_channels: int = 128, dtype: torch.dtype = torch.float32) -> int:
    """Estimated peak bytes one frame adds to a VAE encode or decode of ``height`` x ``width`` pixels."""
    return int(VAE_FACTOR * height * width * base_channels * torch.finfo(dtype).bits // 8)


def vae_peak_bytes(frames: int, height: int, width: int, base_channels: int = 128,
                   dtype: torch.dtype = torch.float32) -> int:
    """Estimated peak activation bytes of one VAE call on ``frames`` frames (weights not included)."""
    return (frames + 1) * vae_frame_bytes(height, width, base_channels, dtype)


def unet_peak_bytes(height: int, width: int, batch: int, dtype: torch.dtype = torch.float16) -> int:
    """Estimated peak activation bytes of one UNet call on ``batch`` latents of a ``height`` x ``width`` image."""
    return int(UNET_FACTOR * (height // 8) * (width // 8) * batch * torch.finfo(dtype).bits // 8)


def module_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of a module's parameters and buffers (meta tensors count their size)."""
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def device_budget(device: torch.device, vram_budget_gib: float | None = None) -> int | None:
    """The bytes a run may use on ``device``: ``--vram-budget`` when given, else the CUDA device's free memory,
    else None (no limit: a CPU or MPS run without a budget)."""
    if vram_budget_gib is not None:
        return int(check_range("vram_budget", vram_budget_gib, 0.25, 4096.0) * GIB)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def check_offload(offload: str) -> str:
    if offload not in OFFLOAD_MODES:
        raise STDInputError("offload", f"got {offload!r}, choose one of {', '.join(OFFLOAD_MODES)}")
    return offload


@dataclass(frozen=True)
class MemoryPlan:
    """Where the components live and how many frames the VAE codes at once (see the module docstring)."""

    device: str
    budget: int | None            # bytes; None: no limit
    offload: str                  # none | model | sequential
    vae_batch: int | None         # frames per VAE call (None: as many as the caller gives)
    vae_tiling: bool
    resident: int                 # bytes of weights that stay on the device
    peak: int                     # estimated peak bytes of the largest stage
    dtypes: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def vae_calls(self, frames: int) -> int:
        """Frames per VAE call for a block of ``frames`` frames."""
        return frames if self.vae_batch is None else max(1, min(self.vae_batch, frames))

    def describe(self) -> str:
        """The line the app and the batch CLI log at start."""
        gib = (lambda b: "no limit" if b is None else f"{b / GIB:.1f} GiB")
        dtypes = ", ".join(f"{k} {str(v).replace('torch.', '')}" for k, v in self.dtypes.items())
        vae = "all frames" if self.vae_batch is None else f"{self.vae_batch} frame(s)"
        text = (f"memory plan on {self.device} ({gib(self.budget)}): offload {self.offload}, VAE {vae} per call"
                f"{', tiled' if self.vae_tiling else ''}; resident {gib(self.resident)}, estimated peak "
                f"{gib(self.peak)}" + (f"; {dtypes}" if dtypes else ""))
        return text + "".join(f"; {n}" for n in self.notes)


def plan_memory(components: dict[str, int], frame: tuple[int, int], *, device: torch.device | str = "cpu",
                budget: int | None = None, offload: str = "auto", vae_channels: int = 128,
                vae_dtype: torch.dtype = torch.float32, unet_dtype: torch.dtype = torch.float16, cfg_batch: int = 2,
                frames_per_batch: int = 1, dtypes: dict | None = None) -> MemoryPlan:
    """Choose the placement and the VAE sub-batch for frames of ``frame`` = (height, width).

    Args:
        components: bytes of each loaded component by name (``unet``, ``vae``, ``text_encoders``, ...); the UNet is
            the largest that must be whole on the device under ``model`` offload.
        device: where the work runs.
        budget: bytes the run may use there (:func:`device_budget`); None plans for no limit.
        offload: ``auto`` or a mode to force (``none`` / ``model`` / ``sequential``).
        frames_per_batch: frames the sampler sees together (its UNet activations scale with them).
    """
    offload = check_offload(offload)
    device = str(device)
    height, width = frame
    total = sum(components.values())
    largest = max(components.values(), default=0)
    vae = components.get("vae", 0)
    unet_act = unet_peak_bytes(height, width, cfg_batch * frames_per_batch, unet_dtype)
    one_frame = vae_peak_bytes(1, height, width, vae_channels, vae_dtype)
    notes = []
    if budget is None:
        mode = "none" if offload == "auto" else offload
        peak = (total if mode == "none" else largest) + max(unet_act, one_frame)
        return MemoryPlan(device, None, mode, None, False, total if mode == "none" else 0, peak, dict(dtypes or {}))
    usable = int(budget * (1 - HEADROOM))
    # what must be on the device while the UNet samples, and while the VAE codes, per placement
    needs = {"none": (total + unet_act, total),
             "model": (largest + unet_act, vae),
             "sequential": (max(components.values(), default=0) // 8 + unet_act, vae // 8)}
    if offload == "auto":
        mode = next((m for m in ("none", "model") if needs[m][0] <= usable and needs[m][1] + one_frame <= usable),
                    "sequential")
    else:
        mode = offload
    if needs[mode][0] > usable:
        notes.append(f"sampling {frames_per_batch} frame(s) at {width}x{height} needs about "
                     f"{needs[mode][0] / GIB:.1f} GiB with offload {mode}, more than the {usable / GIB:.1f} GiB "
                     "usable: lower frames_per_batch or the size" + ("" if mode == "sequential" else
                                                                     ", or use --offload sequential"))
    resident = {"none": total, "model": 0, "sequential": 0}[mode]
    room = usable - needs[mode][1]
    per_frame = vae_frame_bytes(height, width, vae_channels, vae_dtype)
    fits = room // per_frame - 1  # (n + 1) * per_frame <= room
    if fits >= 1:
        vae_batch, tiling = int(fits), False
        vae_peak = needs[mode][1] + (min(vae_batch, max(1, frames_per_batch)) + 1) * per_frame
    else:
        vae_batch, tiling = 1, True
        side = min(TILE_PIXELS, height, width)
        vae_peak = needs[mode][1] + vae_peak_bytes(1, side, side, vae_channels, vae_dtype)
        if vae_peak > usable:
            notes.append("even one VAE tile may not fit: lower the output size")
    peak = max(needs[mode][0], vae_peak)
    return MemoryPlan(device, budget, mode, vae_batch, tiling, resident, peak, dict(dtypes or {}), tuple(notes))
