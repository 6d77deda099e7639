"""Stylize files and folders of images and videos with STD: ``python -m std_app.batch [model flags] INPUT... --output DIR``.

Every input file gives one output in ``--output`` with the same stem: images become PNGs with the settings in
their metadata (``parameters`` and ``std`` text chunks, as the app writes them); videos keep their container (mp4,
webm, mov, mkv, avi, gif; a folder given with ``--frames-folder`` becomes an mp4), frame rate and audio, and are
stylized as a stream, chunk by chunk, so memory does not grow with their length. A folder input contributes the
images and videos directly in it (``--recursive``: also in its subfolders, mirrored under ``--output``).

Outputs already in ``--output`` are skipped unless ``--overwrite``; outputs are written to a temporary name and
renamed when complete, so an interrupted run leaves no half-written file and the next run resumes. A file that
cannot be stylized is reported with its name and the reason, and the run goes on; the summary lists every
failure and the exit status is 1 when any input failed (2: bad arguments or unusable paths, nothing was run).

Several GPUs (or processes): ``accelerate launch --multi_gpu --num_processes N -m std_app.batch ...`` (or
``torchrun --nproc-per-node N -m std_app.batch ...``) gives each process its share of the inputs; the first
process prints the summary of all.

    python -m std_app.batch --tiny photos/ clips/trailer.mp4 --output stylized/ --prompt "an oil painting"
    python -m std_app.batch --models-dir ~/ComfyUI/models --base sd_xl_base_1.0.safetensors in/ --output out/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from comfyui_std.core import STDInputError, check_range
from comfyui_std.core.argv import parse_args as parse_argv
from comfyui_std.core.chunks import Chunking
from comfyui_std.core.folders import walk_files
from comfyui_std.core.noise import NOISE_MODES
from comfyui_std.core.stream import output_format
from comfyui_std.core.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, check_selection

from .cli import add_model_arguments, model_options, tiny_before_positionals
from .settings import DEFAULTS, StyleSettings, from_arguments, start_strength_for
from .settings import add_arguments as add_setting_arguments

log = logging.getLogger("std_app.batch")

#: the container of a stylized video, by source extension


class UsageError(Exception):
    """Bad arguments or unusable paths: reported as ``error: ...`` with exit status 2, before any work."""


def parse_args(argv=None) -> argparse.Namespace:
    return parse_argv(build_parser(), tiny_before_positionals(sys.argv[1:] if argv is None else argv))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m std_app.batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", type=Path, help="image or video files, or folders of them")
    p.add_argument("--output", "-o", type=Path, required=True, help="folder for the outputs (created if missing)")
    p.add_argument("--overwrite", action="store_true", help="stylize again inputs whose output already exists")
    p.add_argument("--recursive", action="store_true", help="also take the files in subfolders of folder inputs")
    p.add_argument("--frames-folder", action="store_true",
                   help="treat each folder input as the frames of one video (sorted by name) instead of a folder of "
                        "separate images")
    p.add_argument("--report", type=Path, help="also write the results as JSON (one entry per input) to this file")
    add_model_arguments(p)
    s = p.add_argument_group("style (as the app's controls; declared in std_app.settings)")
    add_setting_arguments(s)
    s.add_argument("--no-snap-eta", action="store_true", help="Run --start-strength even when the LoRA was trained "
                                                             "for another η. [default: snap to the LoRA's η]")
    s.add_argument("--style", type=Path, help="Style reference image (needs an IP-Adapter).")
    s.add_argument("--size", type=int, help="Long side of the outputs in pixels, aspect kept, multiples of 8; 0 = "
                                            "the input's size. [default: the model's native size]")
    v = p.add_argument_group("video")
    v.add_argument("--frames-per-batch", type=int, help="frames sampled together (with --motion-module: one clip "
                                                         "through it); bounds memory [default: the motion module's "
                                                         "context, 8 for Hotshot-XL and 16 for AnimateDiff; else 16]")
    v.add_argument("--overlap", type=int, default=0, help="frames shared by consecutive batches, cross-faded")
    v.add_argument("--noise", default="shared", choices=list(NOISE_MODES),
                   help="shared: one noise for every frame (temporally consistent)")
    v.add_argument("--frame-load-cap", type=int, default=0, help="stylize at most this many frames (0 = all)")
    v.add_argument("--skip-first-frames", type=int, default=0)
    v.add_argument("--select-every-nth", type=int, default=1)
    v.add_argument("--force-rate", type=float, default=0.0, help="resample to this frame rate (0 = the source's)")
    v.add_argument("--tiled-vae", action="store_true", help="VAE encode/decode in tiles (large frames, small GPU)")
    v.add_argument("--no-audio", action="store_true", help="drop the audio (default: keep the source's)")
    return p


# Inputs -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    source: Path
    output: Path
    kind: str  # "image" or "video"


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    return None


def _output_name(path: Path, kind: str) -> str:
    return path.stem + ("." + ("png" if kind == "image" else output_format(path.suffix.lower().lstrip("."))))


def collect_jobs(inputs: list[Path], output: Path, recursive: bool = False, frames_folder: bool = False,
                 notices: list[str] | None = None) -> list[Job]:
    """One job per input file (folders expanded through the project's one folder walk,
    :func:`comfyui_std.core.folders.walk_files`: links out of the folder, link loops, pipes and the run's own output
    folder are left out, each with a line added to ``notices``); raises :class:`UsageError` for paths that cannot be
    used."""
    jobs: list[Job] = []
    notices = [] if notices is None else notices
    for item in inputs:
        if not item.exists():
            raise UsageError(f"input '{item}' does not exist")
        if item.is_dir():
            if frames_folder:
                jobs.append(Job(item, output / f"{item.resolve().name}.mp4", "video"))
                continue
            out_root = output.resolve()
            own = (out_root,) if out_root != item.resolve() else ()  # an output folder inside the input tree
            files, skipped = walk_files(item, recursive=recursive, suffixes=IMAGE_EXTENSIONS + VIDEO_EXTENSIONS,
                                        exclude=own, outside="skip")
            notices += skipped
            if not files:
                left_out = "".join(f"; {n}" for n in skipped[:5])
                raise UsageError(f"folder '{item}' has no images or videos "
                                 f"({', '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)})"
                                 + ("" if recursive else "; --recursive also looks in its subfolders") + left_out)
            for f in files:
                rel = f.relative_to(item).parent
                jobs.append(Job(f, output / rel / _output_name(f, _kind(f)), _kind(f)))
        elif item.is_file():
            kind = _kind(item)
            if kind is None:
                raise UsageError(f"input '{item}' is not an image or a video "
                                 f"({', '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)})")
            jobs.append(Job(item, output / _output_name(item, kind), kind))
        else:
            raise UsageError(f"input '{item}' is neither a file nor a folder")
    seen: dict[Path, Job] = {}
    sources = {j.source.resolve() for j in jobs}
    for job in jobs:
        key = job.output.resolve()
        if key in sources:
            raise UsageError(f"the output for '{job.source}' would replace the input '{job.output}': choose "
                             f"another --output folder")
        if key in seen:
            if seen[key].source.resolve() == job.source.resolve():
                continue
            raise UsageError(f"'{seen[key].source}' and '{job.source}' would both be written to '{job.output}'; "
                             f"stylize them into different --output folders")
        seen[key] = job
    return list(seen.values())


def check_written_file(path: Path, flag: str, jobs: list[Job]) -> None:
    """A file the run writes besides its outputs (the report) must not be an input or an output of the run."""
    target = path.resolve()
    for job in jobs:
        if target == job.source.resolve():
            raise UsageError(f"{flag} '{path}' is an input of this run; writing it would destroy the input")
        if target == job.output.resolve():
            raise UsageError(f"{flag} '{path}' is where the output for '{job.source}' goes; give another file name")


def prepare_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output '{output}' is a file, not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the --output folder '{output}': {err.strerror or err}") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise UsageError(f"the --output folder '{output}' is not writable")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse out-of-range settings before any model is loaded (the same checks the engine makes)."""
    try:
        values = from_arguments(args)  # the LoRA and its η are chosen once the models are loaded
        if values["start_strength"] is None:
            values["start_strength"] = DEFAULTS.start_strength
        StyleSettings(**values).validated()
        if args.size is not None and args.size != 0:
            from .media import MIN_SIDE

            check_range("size", args.size, MIN_SIDE, 16384, kind=int)
        args.chunking = Chunking(args.frames_per_batch or 16, args.overlap, args.noise)
        check_selection(args.frame_load_cap, args.skip_first_frames, args.select_every_nth, args.force_rate, "none")
    except STDInputError as err:
        raise UsageError(str(err)) from None
    if args.report is not None:
        if args.report.is_dir():
            raise UsageError(f"--report '{args.report}' is a folder; give a file name")
        if not args.report.parent.is_dir():
            raise UsageError(f"--report '{args.report}': the folder '{args.report.parent}' does not exist")
        if not os.access(args.report.parent, os.W_OK | os.X_OK):
            raise UsageError(f"--report '{args.report}': the folder '{args.report.parent}' is not writable")
    if args.style is not None and not args.style.is_file():
        raise UsageError(f"--style '{args.style}' is not a file")


# Running ----------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    source: str
    output: str
    status: str          # "done", "skipped" or "failed"
    reason: str = ""
    frames: int = 0
    seconds: float = 0.0
    notices: tuple[str, ...] = ()
    rank: int = 0        # the process that ran it


class Stylizer:
    """Runs the jobs of one process on a loaded engine with the command line's settings."""

    def __init__(self, engine, args: argparse.Namespace):
        from .engine import resolve_start_strength

        self.engine, self.args = engine, args
        if args.frames_per_batch is None and engine.motion is not None:  # the module's own context by default
            args.chunking = Chunking(engine.motion.info.default_context, args.overlap, args.noise)
        engine.check_clip(args.chunking)
        self.style_image = None
        self.settings, self.notices = {}, {}
        for kind in ("i2i", "v2v"):
            if args.use_lora is None:
                name = engine.catalog.default(kind)
            elif args.use_lora.lower() == "none":
                name = None
            else:
                name = args.use_lora
            entry = engine.catalog.get(name)
            requested = args.start_strength
            if requested is None:
                requested = start_strength_for(entry)
            eta, notice = resolve_start_strength(entry, requested, not args.no_snap_eta)
            self.settings[kind] = StyleSettings(**dict(from_arguments(args), lora=entry and entry.name,
                                                       start_strength=eta)).validated()
            self.notices[kind] = [notice] if notice and args.start_strength is not None else []
        if args.style is not None:
            from .media import read_image

            if engine.style is None:
                raise STDInputError("--style", "no IP-Adapter is loaded, so a style reference cannot be used; pass "
                                               "--ip-adapter and --image-encoder (or put them in the models folder's "
                                               "ipadapter/ and clip_vision/)")
            self.style_image = read_image(Path(args.style), "style image", 4 * engine.native_size)[0]

    @property
    def size(self) -> int | None:
        """The long side of the outputs (None: the input's own size)."""
        return None if self.args.size == 0 else (self.args.size or self.engine.native_size)

    def image(self, job: Job) -> tuple[int, list[str]]:
        from .media import fit_size, frame_to_image, image_to_frames, read_image, run_record, save_png, size_notices

        e = self.engine
        image, notices, source = read_image(Path(job.source), "image", 4 * e.native_size)
        long_side = self.size or max(image.size)
        target = fit_size(image.width, image.height, long_side, e.vae_scale)
        notices = notices + size_notices("image", source, target, long_side)
        result = e.run(image_to_frames(image, target), self.settings["i2i"], self.style_image, progress_bar=False)
        record = run_record(result.settings, result.plan, target, base_model=e.base_label, lora=result.lora,
                            style_used=self.style_image is not None, app="std_app.batch", frames=1,
                            source=job.source.name, seconds=result.seconds)
        partial = job.output.with_name(f".{job.output.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            save_png(frame_to_image(result.frames[0]), partial, record)
            os.replace(partial, job.output)
        except OSError as err:
            raise STDInputError("output", f"could not write '{job.output.name}': {err.strerror or err}") from None
        finally:
            partial.unlink(missing_ok=True)
        return 1, self.notices["i2i"] + notices

    def video(self, job: Job, progress) -> tuple[int, list[str]]:
        a = self.args
        fmt = "mp4" if job.source.is_dir() else None
        result = self.engine.run_video_file(
            job.source, job.output, self.settings["v2v"], self.style_image, size=self.size,
            chunking=a.chunking, frame_load_cap=a.frame_load_cap,
            skip_first_frames=a.skip_first_frames, select_every_nth=a.select_every_nth, force_rate=a.force_rate,
            tiled_vae=a.tiled_vae, audio=not a.no_audio, fmt=fmt, record={"app": "std_app.batch"},
            progress=progress)
        notices = list(result.notices)
        if result.audio != "none":
            notices.append(f"audio {result.audio}")
        return result.frames, self.notices["v2v"] + notices


def run_jobs(stylizer: Stylizer, jobs: list[Job], rank: int = 0, world: int = 1) -> list[Outcome]:
    """Stylize each job; a failure is reported (name and reason) and the run goes on."""
    from tqdm.auto import tqdm

    outcomes = []
    prefix = f"[{rank + 1}/{world}] " if world > 1 else ""
    files = tqdm(jobs, desc=f"{prefix}files", unit="file", position=2 * rank, dynamic_ncols=True)
    for job in files:
        name = str(job.source)
        files.set_postfix_str(job.source.name)
        start = time.perf_counter()
        try:
            job.output.parent.mkdir(parents=True, exist_ok=True)
            if job.kind == "image":
                frames, notices = stylizer.image(job)
            else:
                bar = tqdm(desc=f"{prefix}{job.source.name}", unit="frame", leave=False, position=2 * rank + 1,
                           dynamic_ncols=True)

                def progress(done, total, bar=bar):
                    if total is not None and bar.total != total:
                        bar.total = total
                    bar.update(done - bar.n)

                try:
                    frames, notices = stylizer.video(job, progress)
                finally:
                    bar.close()
        except Exception as err:  # a bad file, out of memory, a full disk: report it and go on with the others
            reason = str(err) if isinstance(err, STDInputError) else (
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            outcomes.append(Outcome(name, str(job.output), "failed", reason, rank=rank))
            tqdm.write(f"failed: {name}: {reason}", file=sys.stderr)
            log.debug("%s failed", name, exc_info=True)
            continue
        seconds = time.perf_counter() - start
        outcomes.append(Outcome(name, str(job.output), "done", "", frames, seconds, tuple(notices), rank))
        for notice in notices:
            tqdm.write(f"{job.source.name}: {notice}", file=sys.stderr)
    files.close()
    return outcomes


def summary(outcomes: list[Outcome]) -> str:
    counts = {k: sum(o.status == k for o in outcomes) for k in ("done", "skipped", "failed")}
    frames = sum(o.frames for o in outcomes)
    seconds = sum(o.seconds for o in outcomes)
    lines = [f"{counts['done']} stylized ({frames} frames, {seconds:.1f} s), {counts['skipped']} skipped (output "
             f"exists), {counts['failed']} failed"]
    lines += [f"  failed: {o.source}: {o.reason}" for o in outcomes if o.status == "failed"]
    return "\n".join(lines)


def _tiny_root(args, state, scratch: Path) -> Path | None:
    """Where ``--tiny`` builds its models: one folder, built by the first process, when there are several (the
    Hugging Face writers save on the main process only)."""
    if not args.tiny:
        return None
    if state is None:
        return scratch
    from accelerate.utils import broadcast_object_list

    from . import tiny

    path = [None]
    if state.is_main_process:
        tiny.build_tiny_models(scratch, args.tiny)
        path = [str(scratch)]
    broadcast_object_list(path)
    return Path(path[0])


def _distributed():
    """(rank, world size, accelerate state) when launched with several processes, else (0, 1, None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state


def main(argv=None) -> int:
    from comfyui_std.core.exits import Stopped, stop_on_signals

    try:
        with stop_on_signals():
            return _main(argv)
    except Stopped as stop:
        print(f"stopped ({stop.name}): finished outputs are kept, the file being written was removed",
              file=sys.stderr)
        return stop.exit_code


def _main(argv=None) -> int:
    from std_hf.quiet import quiet_libraries

    args = parse_args(argv)
    quiet_libraries(args.verbose)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("std_app.memory").setLevel(logging.INFO)  # the device and memory plan, stated at start
    logging.getLogger("std_app.motion").setLevel(logging.INFO)  # the motion module and motion-LoRA counts
    try:
        check_arguments(args)
        walk_notices: list[str] = []
        jobs = collect_jobs(args.inputs, args.output, args.recursive, args.frames_folder, walk_notices)
        for notice in walk_notices:
            print(f"notice: {notice}", file=sys.stderr)
        if args.report is not None:
            check_written_file(args.report, "--report", jobs)
        prepare_output(args.output)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rank, world, state = _distributed()
    mine = jobs[rank::world]  # interleaved: files of similar size usually sit next to each other
    todo = [j for j in mine if args.overwrite or not j.output.is_file()]  # a finished output is a file
    outcomes = [Outcome(str(j.source), str(j.output), "skipped", "output exists (use --overwrite)", rank=rank)
                for j in mine if j not in todo]
    error = None
    with tempfile.TemporaryDirectory(prefix="std-tiny-") as scratch:
        if todo:
            options = model_options(args, _tiny_root(args, state, Path(scratch)))
            if state is not None and args.device == "auto":
                options.device = str(state.device)
            try:
                from .startup import load_engine

                stylizer = Stylizer(load_engine(options), args)
            except STDInputError as err:
                error = str(err)
            else:
                outcomes += run_jobs(stylizer, todo, rank, world)
        elif state is not None:
            _tiny_root(args, state, Path(scratch))  # take part in the broadcast
        if state is not None:  # every process reports to the first (all take part, also after an error)
            from accelerate.utils import gather_object

            parts = gather_object([{"error": error, "outcomes": [asdict(o) for o in outcomes]}])
            error = next((p["error"] for p in parts if p["error"]), None)
            outcomes = [Outcome(**o) for p in parts for o in p["outcomes"]]
    if error is not None:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    order = {str(j.source): i for i, j in enumerate(jobs)}
    outcomes.sort(key=lambda o: order.get(o.source, len(order)))
    if rank == 0:
        print(summary(outcomes))
        if args.report is not None:
            partial = args.report.with_name(f".{args.report.name}.{uuid.uuid4().hex[:8]}.partial")
            try:
                partial.write_text(json.dumps([asdict(o) for o in outcomes], indent=1), encoding="utf-8")
                os.replace(partial, args.report)
            except OSError as err:  # the outputs are written; only the report could not be
                partial.unlink(missing_ok=True)
                print(f"error: could not write --report '{args.report}': {err.strerror or err}", file=sys.stderr)
                return 2
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
