"""Boot the real ComfyUI host in-process on CPU and build the tiny SD1.5 checkpoint it detects.

Used by the real-host tests; they are skipped unless COMFYUI_PATH points at a ComfyUI checkout (0.3.48, 0.3.64 and
0.33.0 are tested; what differs between them for the harness is in the "hosts" section below).
"""

from __future__ import annotations

import asyncio
import importlib.abc
import importlib.machinery
import json
import os
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-std"
REAL_HOST_REASON = ("real-host test: set COMFYUI_PATH to a ComfyUI checkout (tested: 0.3.48, 0.3.64, 0.33.0) "
                    "to run it")


def comfyui_path() -> str | None:
    path = os.environ.get("COMFYUI_PATH")
    return path if path and Path(path, "nodes.py").is_file() else None


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Creates any ``torchvision.*`` / ``torchaudio.*`` module on demand as an empty package.

    PyPI's torchvision and torchaudio wheels are CUDA builds that do not import with the CPU torch used here; ComfyUI
    only needs the names to import (0.3.x: ``torchvision``; from 0.8: ``torchaudio`` in comfy/sd.py; later
    ``torchvision.ops``, ``torchaudio.functional``, ``torchvision.transforms.functional``). Attribute access on a stub
    gives another stub, so ``from torchaudio.functional import resample`` imports; calling one raises."""

    ROOTS = ("torchvision", "torchaudio")

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.ROOTS:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubAttr(f"{self.__name__}.{name}")


class _StubAttr:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, name):
        return _StubAttr(f"{self._name}.{name}")

    def __call__(self, *a, **k):
        raise RuntimeError(f"{self._name} is a test stub (no torchvision/torchaudio build for this CPU torch)")

    def __mro_entries__(self, bases):
        return (object,)


def _stub_torchvision():
    """Install the stub finder for torchvision/torchaudio unless the real packages import."""
    for root in _StubFinder.ROOTS:
        if root in sys.modules and not isinstance(sys.modules[root], _StubModule):
            continue
        try:
            __import__(root)
            continue
        except Exception:
            for name in [n for n in sys.modules if n == root or n.startswith(root + ".")]:
                del sys.modules[name]
        if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _StubFinder())


def tree_snapshot(root: str | None = None) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file and folder of the ComfyUI tree (what the tests must leave untouched)."""
    root = Path(root or comfyui_path())
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def tree_changes(before: dict[str, tuple[int, int]]) -> list[str]:
    """Paths of the ComfyUI tree added, removed or modified since ``before``."""
    after = tree_snapshot()
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def boot(base: Path) -> SimpleNamespace:
    """Import ComfyUI the way main.py does, on CPU, with every folder it writes to under ``base``.

    Nothing is written into the ComfyUI tree (so a read-only copy works): models, input, output, temp and user
    folders point into ``base``, and bytecode of ComfyUI's modules is cached under ``base`` too.
    """
    path = comfyui_path()
    sys.pycache_prefix = str(base / "pycache")
    # diffusers/transformers must be imported before the torchvision stub (their image utils probe it).
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    if path not in sys.path:
        sys.path.insert(0, path)
    _stub_torchvision()
    from comfy.cli_args import args
    args.cpu = True
    import utils.extra_config  # noqa: F401  (must precede `nodes`: comfy/ shadows the `utils` package otherwise)
    import folder_paths
    import nodes

    # Packs that create their model folders at import (AnimateDiff-Evolved: models_dir/animatediff_models) must
    # create them here, not in the ComfyUI tree.
    folder_paths.models_dir = str(base / "models")
    for sub in ("checkpoints", "loras", "ipadapter", "clip_vision", "animatediff_models", "controlnet"):
        d = base / "models" / sub
        d.mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(sub, str(d), is_default=True)
    for sub, setter in (("input", folder_paths.set_input_directory), ("output", folder_paths.set_output_directory),
                        ("temp", folder_paths.set_temp_directory)):
        (base / sub).mkdir(parents=True, exist_ok=True)
        setter(str(base / sub))
    (base / "user").mkdir(parents=True, exist_ok=True)
    folder_paths.set_user_directory(str(base / "user"))
    unthrottle_progress()
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    # Install the pack as a user would: a clone under custom_nodes/ (a symlink to this checkout).
    custom = base / "custom_nodes"
    custom.mkdir(exist_ok=True)
    pack = custom / PACK_NAME
    if not pack.exists():
        pack.symlink_to(REPO, target_is_directory=True)
    loaded = asyncio.run(nodes.load_custom_node(str(pack)))
    install_tiny_clip_vision_loader(base)
    return SimpleNamespace(nodes=nodes, base=base, M=nodes.NODE_CLASS_MAPPINGS, loaded=loaded, pack=pack,
                           folder_paths=folder_paths)


def _init_(sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            out[k] = v
        elif "norm" in k and k.endswith("weight"):
            out[k] = torch.ones_like(v)
        elif k.endswith("bias"):
            out[k] = torch.zeros_like(v)
        else:
            out[k] = torch.randn(v.shape, generator=g) * 0.02
    return out


TINY_UNET = dict(in_channels=4, out_channels=4, model_channels=320, context_dim=768, num_heads=8, num_head_channels=-1,
                 use_spatial_transformer=True, use_linear_in_transformer=False, adm_in_channels=None,
                 use_temporal_attention=False, channel_mult=[1, 1, 1], num_res_blocks=[1, 1, 1],
                 transformer_depth=[1, 1, 1], transformer_depth_output=[1] * 6, transformer_depth_middle=1,
                 image_size=32)


def build_tiny_sd15(path: Path, seed: int = 0) -> Path:
    """A tiny randomly initialised checkpoint that ComfyUI detects as SD15: 3-level UNet with one transformer per
    level (so SD1.5's up_blocks.1 / down_blocks.2 style and layout blocks exist), 12-layer CLIP-L, TAESD VAE."""
    import comfy.clip_model
    import comfy.ops
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file

    comfy_root = Path(comfyui_path())
    with torch.device("meta"):
        unet = UNetModel(**TINY_UNET, operations=comfy.ops.disable_weight_init)
        clip_cfg = json.loads((comfy_root / "comfy" / "sd1_clip_config.json").read_text())
        clip = comfy.clip_model.CLIPTextModel(clip_cfg, torch.float32, None, comfy.ops.manual_cast)
        vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    sd = {}
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in clip.state_dict().items()})
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in sd.items()}
    sd = _init_(sd, seed)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def build_tiny_controlnet(path: Path, seed: int = 1, hint_channels: int = 3) -> Path:
    """A tiny randomly initialised SD1.5 ControlNet for the tiny checkpoint, in the original LDM layout
    (``control_model.*``, as the lllyasviel ControlNets ship) and built with ComfyUI's own ``cldm.ControlNet``.

    Real ControlNets start with zero "zero convolutions" and learn them; here they are random too, so the control
    signal changes the output and the tests can see it."""
    import comfy.cldm.cldm
    import comfy.ops
    from safetensors.torch import save_file

    cfg = {k: v for k, v in TINY_UNET.items() if k not in ("out_channels", "transformer_depth_output")}
    with torch.device("meta"):
        net = comfy.cldm.cldm.ControlNet(**cfg, hint_channels=hint_channels, operations=comfy.ops.disable_weight_init)
    sd = {f"control_model.{k}": torch.empty(v.shape, dtype=v.dtype) for k, v in net.state_dict().items()}
    sd = _init_(sd, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in sd.items():  # He-initialised hint encoder, so the hint image itself (not only x) steers the output
        if k.startswith("control_model.input_hint_block.") and k.endswith(".weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / (v.shape[1] * v[0, 0].numel())) ** 0.5
    sd = {k: v.half() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


class FakeServer:
    """The fields PromptExecutor touches; records every event."""

    def __init__(self):
        self.client_id = "tests"
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.events: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def queue_updated(self):
        pass


def progress_hook(server: FakeServer, on_step=None):
    """What main.py installs: check the interrupt flag, then report progress to the client."""
    import comfy.model_management
    from comfy_execution.utils import get_executing_context

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        if on_step is not None:
            on_step(value, total)
        comfy.model_management.throw_exception_if_processing_interrupted()
        server.send_sync("progress", {"value": value, "max": total, "node": node_id,
                                      "preview": preview_image is not None}, server.client_id)

    return hook


def execute(prompt: dict, *, server: FakeServer | None = None, on_step=None):
    """Validate and execute an API-format prompt through ComfyUI's own executor. Returns (executor, server)."""
    import comfy.utils
    import execution

    server = server or FakeServer()
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt("p", prompt, None))
    if not ok:
        raise AssertionError(f"prompt invalid: {err} {node_errors}")
    ex = new_executor(server)
    comfy.utils.set_progress_bar_global_hook(progress_hook(server, on_step))
    try:
        ex.execute(prompt, "p", {"client_id": server.client_id}, outputs)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    return ex, server


# --------------------------------------------------------------------------------------------------------------------
# The hosts: what differs between the ComfyUI versions the tests run on (0.3.48, 0.3.64, 0.33), in one place.


def comfyui_version() -> tuple[int, ...]:
    """The version of the ComfyUI tree at COMFYUI_PATH, from its ``comfyui_version.py``."""
    text = Path(comfyui_path(), "comfyui_version.py").read_text()
    value = text.split("__version__", 1)[1].split("=", 1)[1].strip().split()[0].strip("\"'")
    return tuple(int(p) for p in value.split(".")[:3])


#: from this version ComfyUI refuses a V3 dropdown value outside its options itself, before the node runs
#: (upstream commit 0be8a76c); earlier hosts pass it to the node, which answers with the pack's message
CHOICES_VALIDATED_FROM = (0, 8, 0)


def choice_refusal(name: str, value, options, pack_message: str) -> str:
    """What a client reads when a dropdown that is not a file list gets ``value``: ComfyUI's own "Value not in
    list" (which names the input, the value and the options) where the host validates dropdowns, else the pack's
    message. (Dropdowns of files are always left to the pack: see comfyui_std/nodes/comfy_compat.py.)"""
    if comfyui_version() >= CHOICES_VALIDATED_FROM:
        return f'"details": "{name}: {value!r} not in {list(options)!r}"'
    return pack_message


def unthrottle_progress() -> None:
    """Newer ComfyUI (0.2x) sends a progress update only every 100 ms and 0.5 % unless it is the first, the last or
    carries a preview; the tests count every step, so the throttle is set to nothing where it exists."""
    import comfy.utils

    for name in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):
        if hasattr(comfy.utils, name):
            setattr(comfy.utils, name, 0)


def new_executor(server):
    """A ``PromptExecutor`` with the classic cache. From 0.19 the executor reads ``cache_args["ram"]`` on every run,
    so the argument is passed wherever its signature takes it."""
    import inspect

    import execution

    kwargs = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        kwargs["cache_args"] = {"lru": 0, "ram": 0, "ram_inactive": 0}
    return execution.PromptExecutor(server, **kwargs)


def cached_outputs(executor, node_id: str):
    """The outputs a finished run left in the executor's cache for ``node_id`` (a list per output slot).

    Up to 0.3.64 the cache is synchronous and stores the outputs list; from 0.18 ``get`` is a coroutine and entries
    are ``CacheEntry(ui, outputs)``."""
    import inspect

    entry = executor.caches.outputs.get(node_id)
    if inspect.isawaitable(entry):
        entry = asyncio.run(entry)
    return entry.outputs if hasattr(entry, "outputs") else entry


class preview_method:
    """Context manager: latent previews of ``method`` for the prompts run inside it. From 0.5 every prompt resets
    ``args.preview_method`` to ``latent_preview.default_preview_method``, so both are set (and restored)."""

    def __init__(self, method):
        self.method = method

    def __enter__(self):
        import latent_preview
        from comfy.cli_args import args

        self.saved = (args.preview_method, getattr(latent_preview, "default_preview_method", None))
        args.preview_method = self.method
        if hasattr(latent_preview, "default_preview_method"):
            latent_preview.default_preview_method = self.method
        return self

    def __exit__(self, *exc):
        import latent_preview
        from comfy.cli_args import args

        args.preview_method = self.saved[0]
        if hasattr(latent_preview, "default_preview_method"):
            latent_preview.default_preview_method = self.saved[1]
        return False


def run_node(cls, *args, **kwargs):
    """Run a node class directly and return its outputs tuple: V3 nodes through ``execute(...).result``, old-style
    nodes (0.3.48's core ``LoadVideo`` and friends) through their ``FUNCTION``."""
    if getattr(cls, "FUNCTION", None) and not hasattr(cls, "define_schema"):
        return getattr(cls(), cls.FUNCTION)(*args, **kwargs)
    return cls.execute(*args, **kwargs).result


def copy_input(src: Path, input_dir: Path, name: str | None = None) -> str:
    name = name or src.name
    shutil.copy(src, input_dir / name)
    return name


LORA_TARGETS = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight", ".proj_in.weight",
                ".proj_out.weight", ".ff.net.0.proj.weight", ".ff.net.2.weight")


def write_peft_lora(model, path: Path, rank: int = 4, scale: float = 0.05, metadata: dict | None = None,
                    seed: int = 0, prefix: str = "unet.") -> int:
    """A diffusers/PEFT-format LoRA (``unet.<diffusers path>.lora_A/B.weight``) for a ComfyUI model; returns #layers."""
    import comfy.utils
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    sd = model.model.diffusion_model.state_dict()
    out = {}
    for dkey, lkey in mapping.items():
        if not dkey.endswith(LORA_TARGETS) or lkey not in sd:
            continue
        w = sd[lkey]
        base = prefix + dkey[: -len(".weight")]
        extra = [1] * (w.ndim - 2)
        out[base + ".lora_A.weight"] = torch.randn(rank, w.shape[1], *extra, generator=g) * scale
        out[base + ".lora_B.weight"] = torch.randn(w.shape[0], rank, *extra, generator=g) * scale
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=metadata)
    return len(out) // 2


# --------------------------------------------------------------------------------------------------------------------
# Tiny CLIP vision encoder and IP-Adapter for the style-reference tests

TINY_CLIP_VISION = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 64,
                    "image_size": 64, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 128,
                    "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 4,
                    "num_channels": 3, "num_hidden_layers": 3, "patch_size": 32, "projection_dim": 32,
                    "torch_dtype": "float32"}


def _tiny_clip_vision_json(base: Path, projection_dim: int) -> Path:
    path = base / f"tiny_clip_vision_{projection_dim}.json"
    if not path.exists():
        path.write_text(json.dumps({**TINY_CLIP_VISION, "projection_dim": projection_dim}))
    return path


def install_tiny_clip_vision_loader(base: Path) -> None:
    """Teach comfy.clip_vision to recognise the tiny 3-layer encoder the tests write (it only knows full-size
    ViT-L/H/G, SigLIP and DINOv2 by their layer counts); every other file loads as before."""
    import comfy.clip_vision as cv

    if getattr(cv.load_clipvision_from_sd, "_std_tiny", False):
        return
    original = cv.load_clipvision_from_sd

    def load_clipvision_from_sd(sd, prefix="", convert_keys=False):
        if ("vision_model.encoder.layers.2.layer_norm1.weight" in sd
                and "vision_model.encoder.layers.3.layer_norm1.weight" not in sd
                and sd["vision_model.encoder.layers.0.layer_norm1.weight"].shape[0] == TINY_CLIP_VISION["hidden_size"]):
            clip = cv.ClipVisionModel(str(_tiny_clip_vision_json(base, sd["visual_projection.weight"].shape[0])))
            clip.load_sd(sd)
            return clip
        return original(sd, prefix, convert_keys)

    load_clipvision_from_sd._std_tiny = True
    cv.load_clipvision_from_sd = load_clipvision_from_sd


def write_tiny_clip_vision(base: Path, path: Path, projection_dim: int = 32, seed: int = 0) -> Path:
    import comfy.clip_vision as cv
    from safetensors.torch import save_file

    clip = cv.ClipVisionModel(str(_tiny_clip_vision_json(base, projection_dim)))
    sd = _init_({k: torch.empty(v.shape, dtype=torch.float32) for k, v in clip.get_sd().items()}, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def write_tiny_ip_adapter(model, path: Path, clip_dim: int = 32, tokens: int = 4, seed: int = 0,
                          cross_dim: int | None = None, num_layers: int | None = None, scale: float = 0.2) -> Path:
    """A standard-layout IP-Adapter (image_proj.proj/norm, ip_adapter.{2k+1}.to_k_ip/to_v_ip) sized for ``model``'s
    cross-attention layers; ``cross_dim``/``num_layers`` override the sizes to make an adapter for another base."""
    import comfy.utils
    from safetensors.torch import save_file

    from comfyui_std.core.style_blocks import ip_layer_order

    unet_config = model.model.model_config.unet_config
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    sd_model = model.model.diffusion_model.state_dict()
    inner = {}
    for dkey, ckey in mapping.items():
        if dkey.endswith(".attn2.to_k.weight") and ckey in sd_model:
            inner[dkey[: -len(".to_k.weight")]] = sd_model[ckey].shape[0]
    dims = [inner[n] for n in ip_layer_order(inner)]
    cross = cross_dim or unet_config["context_dim"]
    if num_layers is not None:
        dims = (dims * num_layers)[:num_layers]
    g = torch.Generator().manual_seed(seed)
    sd = {"image_proj.proj.weight": torch.randn(tokens * cross, clip_dim, generator=g) * scale,
          "image_proj.proj.bias": torch.zeros(tokens * cross),
          "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    for k, d in enumerate(dims):
        sd[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = torch.randn(d, cross, generator=g) * scale
        sd[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = torch.randn(d, cross, generator=g) * scale
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() for k, v in sd.items()}, str(path))
    return path


def prepare_workflow(path, ckpt, files):
    """An API workflow with its model and file names replaced by the test files (and short CPU runs)."""
    prompt = json.loads(path.read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "STDIPAdapterLoader":
            inputs["ipadapter_file"] = files["ipadapter"]
        if node["class_type"] == "CLIPVisionLoader":
            inputs["clip_name"] = files["clip_name"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = ckpt
        if node["class_type"] == "STDLoraLoader":
            inputs["lora_name"] = files["lora"]
        if node["class_type"] == "ControlNetLoader":
            inputs["control_net_name"] = files["controlnet"]
        if node["class_type"] == "SiDOneStep":
            inputs["width"] = inputs["height"] = 64
        for k in ("nfe",):
            if k in inputs and not isinstance(inputs[k], list):
                inputs[k] = 3  # keep CPU runs short
    return prompt


def client_message(prompt) -> str:
    """What a client is told: the validator's errors, or the execution error's message."""
    import execution

    ok, err, _, node_errors = asyncio.run(execution.validate_prompt("bad", prompt, None))
    if not ok:
        return json.dumps([err, node_errors])
    ex, server = execute(prompt)
    assert not ex.success, "the bad prompt ran"
    msgs = [d["exception_message"] for e, d in server.events if e == "execution_error"]
    assert msgs and "Traceback" not in msgs[0]
    return msgs[0]


# --------------------------------------------------------------------------------------------------------------------
# The peer packs (VideoHelperSuite, AnimateDiff-Evolved, IPAdapter_plus) for the interop tests and workflow tools

PEER_PACKS = ("ComfyUI-VideoHelperSuite", "ComfyUI-AnimateDiff-Evolved", "ComfyUI_IPAdapter_plus")
PEERS_ENV = "STD_PEERS_PATH"


def peers_path() -> Path:
    """Where the peer packs are: ``$STD_PEERS_PATH``, else ``shared/peers`` beside the repository."""
    env = os.environ.get(PEERS_ENV, "").strip()
    return Path(env) if env else REPO.parent / "shared" / "peers"


def missing_peers(path: Path) -> list[str]:
    """The peer packs (folder names) that ``path`` lacks."""
    return [name for name in PEER_PACKS if not (Path(path) / name / "__init__.py").is_file()]


def boot_with_peers(base: Path, peers: Path) -> SimpleNamespace:
    """comfy_host.boot (ComfyUI + this pack) plus a PromptServer and the three peer packs under custom_nodes/."""
    missing = missing_peers(peers)
    if missing:
        raise FileNotFoundError(f"peer packs not found in {peers}: {', '.join(missing)}")
    host = boot(Path(base))
    sys.dont_write_bytecode = True  # belt and braces: the peers' folders are read-only for us
    import nodes
    import server

    if getattr(server.PromptServer, "instance", None) is None:  # VHS reads PromptServer.instance at import
        server.PromptServer(asyncio.new_event_loop())
    base_node_names = set(nodes.NODE_CLASS_MAPPINGS)
    host.peers = {}
    for name in PEER_PACKS:
        link = host.pack.parent / name
        if not link.exists():
            link.symlink_to(Path(peers).resolve() / name, target_is_directory=True)
        host.peers[name] = asyncio.run(nodes.load_custom_node(str(link), base_node_names,
                                                              module_parent="custom_nodes"))
    return host
