"""What the STD nodes share: categories, input declarations, the error decorator and the run preamble.

Only imported inside ComfyUI. Node modules import from here (public names only); the sampling-stack glue lives in
:mod:`.comfy_glue`.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import folder_paths

from comfy_api.latest import io

from ..core import PLANS, STDInputError, std_plan
from ..core.chunks import MAX_FRAMES_PER_BATCH
from ..core.errors import redact_paths
from ..core.noise import NOISE_MODES
from ..core.plan import check_nfe, check_start_strength
from .comfy_glue import check_latent, check_model_sampling

log = logging.getLogger("comfyui_std")

#: node categories (the menu paths in ComfyUI's node library); node ids never change, categories may
CATEGORY_SAMPLING = "STD/sampling"
CATEGORY_STYLE = "STD/style"
CATEGORY_VIDEO = "STD/video"
CATEGORY_LOADERS = "STD/loaders"
CATEGORY_SID = "SiD"

NFE_TIP = ("Number of sampler steps (network evaluations per CFG branch). STD students are distilled for 4-8; "
           "the most at a given start_strength is limited by the 50-step grid.")
ETA_TIP = ("start_strength (η): how far into the noise schedule the input is pushed before sampling (0-1]. "
           "Use the η the STD LoRA was trained for (0.65/0.75/0.85/0.95): higher stylises more, lower keeps more content.")
GAMMA_TIP = ("Per-step stochasticity of the TCD/STD step (0 = deterministic DDIM-like steps, what the official STD "
             "inference runs; 1 = LCM-like full re-noising). Called 'eta' in diffusers' TCDScheduler.step.")
PLAN_TIP = ("official: the timesteps the official STD inference visits (diffusers img2img + TCD, "
            "num_inference_steps = ceil(nfe/η)). trained_start: start exactly at the timestep the LoRA was trained "
            "to start from (ceil(50η) on the 50-step grid) and space nfe steps below it.")


def user_errors(execute):
    """Decorate a node's ``execute``: a core :class:`STDInputError` reaches ComfyUI as a plain ``ValueError`` with
    the same message ("input: what is wrong"), without the chained traceback of the core and with any server path
    cut to its last part (the client of a ComfyUI server must not learn its folders)."""

    @functools.wraps(execute)
    def wrapper(*args, **kwargs):
        try:
            return execute(*args, **kwargs)
        except STDInputError as err:
            raise ValueError(redact_paths(str(err))) from None

    return wrapper


def plan_ui(plan) -> dict:
    return {"text": [plan.describe()]}


def nfe_input(default: int = 8) -> io.Int.Input:
    return io.Int.Input("nfe", default=default, min=1, max=50, tooltip=NFE_TIP)


def start_strength_input(default: float = 0.75) -> io.Float.Input:
    return io.Float.Input("start_strength", default=default, min=0.01, max=1.0, step=0.01, tooltip=ETA_TIP)


def gamma_input() -> io.Float.Input:
    return io.Float.Input("gamma", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=GAMMA_TIP)


def plan_input() -> io.Combo.Input:
    return io.Combo.Input("plan", options=list(PLANS), default="official", optional=True, tooltip=PLAN_TIP)


def conditioning_inputs(model_tip: str) -> list:
    """model, positive, negative: the inputs every STD stylize node starts with."""
    return [
        io.Model.Input("model", tooltip=model_tip),
        io.Conditioning.Input("positive", tooltip="Prompt describing the target style."),
        io.Conditioning.Input("negative", tooltip="Negative prompt (used when cfg > 1)."),
    ]


def chunking_inputs() -> list:
    """frames_per_batch, overlap, noise: how a video node cuts a clip into chunks (a core ``Chunking``)."""
    return [
        io.Int.Input("frames_per_batch", default=16, min=1, max=MAX_FRAMES_PER_BATCH,
                     tooltip="Frames sampled together; bounds peak memory."),
        io.Int.Input("overlap", default=0, min=0, max=MAX_FRAMES_PER_BATCH - 1,
                     tooltip="Frames shared by consecutive chunks, cross-faded to hide seams "
                             "(must be below frames_per_batch)."),
        io.Combo.Input("noise", options=list(NOISE_MODES), default="shared",
                       tooltip="shared: every frame gets the same noise, so static regions stay identical "
                               "(temporally consistent); per_frame: independent noise per frame."),
    ]


def run_inputs() -> list:
    """seed, nfe, start_strength, gamma, cfg: what decides an STD run besides the model and the content."""
    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Seed of the noise added at the start timestep."),
        nfe_input(),
        start_strength_input(),
        gamma_input(),
        io.Float.Input("cfg", default=6.0, min=0.0, max=30.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale (the official STD demo uses 6; 1 disables the "
                               "negative branch and halves the cost)."),
    ]


def stylize_inputs(model_tip: str, latent_tip: str) -> list:
    """The inputs STD Stylize and STD Stylize Video share, in widget order (before their own extras)."""
    return [*conditioning_inputs(model_tip), io.Latent.Input("latent_image", tooltip=latent_tip), *run_inputs()]


def prepare_run(model, nfe, start_strength, plan="official", latent=None):
    """The preamble of every STD node: check the model's schedule (and the latent), compute the plan and its sigmas
    on the model's own ``model_sampling``. Returns ``(plan, sigmas, samples)``; samples is None without a latent."""
    ms = check_model_sampling(model)
    samples = check_latent(model, latent) if latent is not None else None
    p = std_plan(check_nfe(nfe), check_start_strength(start_strength), plan or "official")
    sigmas = p.sigmas(ms)
    log.info(p.describe())
    return p, sigmas, samples


#: extra folders (os.pathsep-separated) the server owner allows file paths in, besides ComfyUI's input/output/temp
ROOTS_ENV = "STD_ALLOWED_PATHS"


def allowed_roots() -> list[Path]:
    """ComfyUI's input, output and temp folders plus the folders named in ``STD_ALLOWED_PATHS`` (real paths)."""
    roots = [folder_paths.get_input_directory(), folder_paths.get_output_directory(), folder_paths.get_temp_directory()]
    roots += [r for r in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if r.strip()]
    return [Path(os.path.realpath(os.path.expanduser(r.strip()))) for r in roots]


def _inside(path: Path, roots) -> bool:
    return any(path == root or root in path.parents for root in roots)


def input_file(name: str, what: str) -> Path:
    """A file (or frames folder) picked from ComfyUI's input folder by name (``name [output]`` / ``[temp]`` pick the
    output or temp folder, as in ComfyUI's loaders). The name is normalised and must stay inside that folder:
    ``../``, absolute names and symlinks leading out are refused with one message, whether or not the target exists."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what}: choose a file from ComfyUI's input folder")
    rel, base = folder_paths.annotated_filepath(name.strip())
    base = Path(os.path.realpath(base or folder_paths.get_input_directory()))
    real = Path(os.path.realpath(os.path.join(base, rel)))
    if os.path.isabs(rel) or not _inside(real, [base]) or real == base:
        raise ValueError(f"{what}: '{name}' is not a file in ComfyUI's input folder")
    return real


def user_path(path: str, what: str) -> Path:
    """A path typed into a node: relative to ComfyUI's input folder, or absolute inside the input, output or temp
    folder or a folder the server owner allowed with ``STD_ALLOWED_PATHS``. Anything else is refused with one message
    (the same whether or not it exists), so an API client cannot read or probe the server's files."""
    raw = os.path.expanduser(path.strip().strip('"'))
    if not os.path.isabs(raw):
        return input_file(raw, what)
    real = Path(os.path.realpath(raw))
    if not _inside(real, allowed_roots()):
        raise ValueError(f"{what}: '{path}' is outside ComfyUI's input and output folders; the server owner can allow "
                         f"more folders with the {ROOTS_ENV} environment variable")
    return real
