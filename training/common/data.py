"""Training data: a folder of images and/or videos with optional same-stem ``.txt`` captions (UTF-8).

* **Aspect-ratio buckets** (kohya-style): sizes of about ``resolution²`` pixels with sides a multiple of 64 (8 below
  256 px) and aspect ratios from 1:2 to 2:1; every item goes to the bucket nearest its aspect ratio, is resized to
  cover it and randomly cropped; a batch holds one bucket. With buckets off there is one square bucket.
* **Order**: batches are a pure function of (seed, rank, step): per epoch each bucket's items are permuted and
  chunked into batches, the batches are shuffled, and rank r takes every world-th one, so a resumed run sees exactly
  the batches the uninterrupted one would have seen. Crops, flips and clip offsets of sample k of a micro-step come
  from its own generator (:func:`pixel_generator`: seed, rank, micro-step, k), so they do not depend on who decodes.
* **Workers** (``--num-workers N``, :class:`PixelPrefetcher`): N DataLoader processes decode and crop the samples of
  the coming micro-steps while the GPU works on the current one. The pixels are the same with 0 or N workers (the
  same generators), so runs, resumed runs and worker counts export identical tensors.
* **Pixels** come from the core's conversion (:func:`comfyui_std.core.images.image_to_float`, as in the nodes and
  the app): EXIF orientation applied, 16-bit and float images at their own levels (not clipped to white), ICC
  profiles to sRGB; transparent pixels are placed on white, as the app does. Images: png, jpg, webp, bmp, tif.
* **Video clips** start at a random frame (seeded) and take ``num_frames`` frames ``frame_stride`` apart; a video
  too short for one clip is skipped at scan time, as are unreadable files (both counted and logged).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.data

from comfyui_std.core.folders import walk_files
from comfyui_std.core.frames import cover_size, resize
from comfyui_std.core.images import EXIF_ORIENTATION, IMAGE_EXTENSIONS, image_to_float
from comfyui_std.core.video import VIDEO_EXTENSIONS, load_video, open_video
from training.common.errors import TrainingUserError

log = logging.getLogger("training")
MAX_ASPECT = 2.0


@dataclass
class Item:
    path: Path
    caption: str
    video: bool
    width: int
    height: int
    frames: int = 1  # videos: frames in the file


class DataError(TrainingUserError, ValueError):
    """Training data that cannot be used (missing, unreadable, too small, ...)."""


def _probe_video(path: Path) -> tuple[int, int, int]:
    """(width, height, frame count) of a video: the core reader's probe (packets counted, the first frame decoded)."""
    with open_video(path, 1, probe=True) as reader:
        info = reader.info
    return info.source_width, info.source_height, int(info.source_frames or 0)


#: the longest caption file read (a caption is a sentence or a tag list; CLIP reads 77 tokens of it)
MAX_CAPTION_BYTES = 64 * 1024


def read_caption(path: Path, root: Path | None = None) -> str:
    """A same-stem caption: a regular UTF-8 file of at most :data:`MAX_CAPTION_BYTES` inside the data folder (a
    FIFO would block, a link to /dev/zero never end, a link out of the folder read another user's file)."""
    import stat as stat_

    real = path.resolve()
    if root is not None and not real.is_relative_to(root.resolve()):
        raise DataError(f"data: caption {path} links to {real}, outside the data folder; copy the text into the "
                        "folder instead")
    info = real.stat()
    if not stat_.S_ISREG(info.st_mode):
        raise DataError(f"data: caption {path} is not a regular file (a folder, pipe or device); a caption is a text "
                        "file")
    if info.st_size > MAX_CAPTION_BYTES:
        raise DataError(f"data: caption {path} is {info.st_size} bytes; captions are at most {MAX_CAPTION_BYTES} "
                        "bytes (the text encoder reads 77 tokens)")
    try:
        return real.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise DataError(f"data: caption {path} is not UTF-8 text (invalid byte at offset {err.start}); save it as "
                        "UTF-8") from None


def data_files(root: Path, exclude: tuple[Path, ...] = ()) -> tuple[list[Path], list[str]]:
    """The regular files under ``root`` (recursively, sorted) and notices for what the walk left out: the project's
    one folder walk (:func:`comfyui_std.core.folders.walk_files`) with links out of the folder skipped and the
    ``exclude`` folders (a run folder inside the data folder: its previews are not training data) not read."""
    return walk_files(root, recursive=True, exclude=exclude, outside="skip")


def scan_folder(folder: str, style_prompt: str = "", videos: bool = False,
                clip_span: int = 1, exclude: tuple[Path, ...] = ()) -> tuple[list[Item], int]:
    """Readable items of ``folder`` (recursively, see :func:`data_files`) and the number of files skipped
    (unreadable, or videos shorter than ``clip_span`` frames)."""
    from PIL import Image

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"data: {folder} is not a folder; give a folder of images (png/jpg/webp/tif) and/or videos")
    items, skipped = [], 0
    paths, notices = data_files(root, exclude)
    for notice in notices:
        log.warning("data: %s", notice)
    for p in paths:
        suffix = p.suffix.lower()
        if suffix not in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
            continue
        is_video = suffix in VIDEO_EXTENSIONS
        if videos and not is_video:
            continue  # video mode trains on clips only; image mode also takes one random frame of each video
        try:
            if is_video:
                w, h, n = _probe_video(p)
            else:
                with Image.open(p) as im:
                    im.verify()
                with Image.open(p) as im:  # verify() leaves the image unusable
                    w, h = im.size
                    if im.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):  # shown turned by 90 degrees
                        w, h = h, w
                n = 1
        except Exception as err:  # PIL/PyAV raise many types for corrupt files
            skipped += 1
            log.warning("data: skipping unreadable %s (%s)", p.name, type(err).__name__)
            continue
        if is_video and videos and n < clip_span:
            skipped += 1
            log.warning("data: skipping %s: %d frames, a clip needs %d", p.name, n, clip_span)
            continue
        cap = p.with_suffix(".txt")
        caption = read_caption(cap, root) if (cap.exists() or cap.is_symlink()) else ""
        if style_prompt:
            caption = f"{caption}, {style_prompt}" if caption else style_prompt
        items.append(Item(p, caption, is_video, int(w), int(h), int(n)))
    if not items:
        kinds = "videos" if videos else "images"
        raise DataError(f"data: no readable {kinds} in {root} ({skipped} file(s) skipped)")
    return items, skipped


# --------------------------------------------------------------------------------------------------------------------
# Buckets

def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(height, width) buckets of at most ``resolution²`` pixels, sides a multiple of the step, ratio <= 2."""
    step = 64 if resolution >= 256 else 8
    area = resolution * resolution
    out = {(resolution, resolution)}
    w = step
    while w <= resolution * MAX_ASPECT:
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= MAX_ASPECT:
            out.add((h, w))
            out.add((w, h))
        w += step
    return sorted(out)


def assign_buckets(items: list[Item], resolution: int, enabled: bool = True) -> list[tuple[int, int]]:
    """The bucket of every item: the one nearest its aspect ratio (then the largest), or the square."""
    if not enabled:
        return [(resolution, resolution)] * len(items)
    sizes = bucket_sizes(resolution)
    out = []
    for it in items:
        a = math.log(it.width / it.height)
        out.append(min(sizes, key=lambda s: (round(abs(math.log(s[1] / s[0]) - a), 6), -s[0] * s[1])))
    return out


class BucketSampler:
    """Which items a (rank, micro-step) trains on: one bucket per batch, a fresh shuffle per epoch, disjoint batches
    per rank."""

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.buckets, self.bs, self.seed, self.rank, self.world = buckets, batch_size, seed, rank, world
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(buckets):
            self.groups.setdefault(b, []).append(i)
        self.keys = sorted(self.groups)
        self.per_epoch = sum(math.ceil(len(v) / batch_size) for v in self.groups.values())
        self._cache: dict[int, list[tuple[tuple[int, int], list[int]]]] = {}

    def _epoch(self, epoch: int):
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            batches = []
            for key in self.keys:
                members = self.groups[key]
                perm = [members[int(i)] for i in torch.randperm(len(members), generator=g)]
                for s in range(0, len(perm), self.bs):
                    chunk = perm[s:s + self.bs]
                    while len(chunk) < self.bs:  # a short last batch is filled from the same bucket
                        chunk.append(perm[int(torch.randint(len(perm), (), generator=g))])
                    batches.append((key, chunk))
            order = torch.randperm(len(batches), generator=g)
            self._cache = {epoch: [batches[int(i)] for i in order]}
        return self._cache[epoch]

    def batch(self, micro_step: int) -> tuple[tuple[int, int], list[int]]:
        pos = micro_step * self.world + self.rank
        epoch, k = divmod(pos, self.per_epoch)
        return self._epoch(epoch)[k]

    def indices(self, micro_step: int) -> list[int]:
        return self.batch(micro_step)[1]


# --------------------------------------------------------------------------------------------------------------------
# Pixels

def micro_step_generator(seed: int, rank: int, micro_step: int, salt: int = 0) -> torch.Generator:
    """The generator of one (rank, micro-step, salt): all randomness of a training step comes from these."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank * 7_919 + micro_step * 104_729 + salt) % (2**63 - 1))


#: salts of the pixel generators (one per sample of a batch); the methods use salts below it
PIXEL_SALT = 1_000


def pixel_generator(seed: int, rank: int, micro_step: int, position: int) -> torch.Generator:
    """The generator of the crop, flip and clip offset of sample ``position`` of a micro-step's batch."""
    return micro_step_generator(seed, rank, micro_step, PIXEL_SALT + position)

@dataclass
class Crop:
    """Where a training sample came from: the source size and the crop (SDXL's size conditioning)."""
    original: tuple[int, int]   # (h, w) of the source
    top: int                    # crop corner in the resized image (SDXL's crop_coords_top_left)
    left: int
    flipped: bool


def _cover_crop(img: torch.Tensor, size: tuple[int, int], gen: torch.Generator | None, flip: bool):
    """[C,H,W] or [F,C,H,W] in 0..1 -> resized to cover ``size`` (h, w), random (or center) crop, optional flip."""
    h, w = img.shape[-2:]
    th, tw = size
    nh, nw = cover_size(h, w, size)
    x = resize(img if img.ndim == 4 else img[None], (nh, nw))
    if gen is None:
        top, left = (nh - th) // 2, (nw - tw) // 2
    else:
        top = int(torch.randint(nh - th + 1, (), generator=gen))
        left = int(torch.randint(nw - tw + 1, (), generator=gen))
    x = x[..., top:top + th, left:left + tw]
    flipped = bool(flip and gen is not None and torch.rand((), generator=gen) < 0.5)
    if flipped:
        x = x.flip(-1)
    return (x if img.ndim == 4 else x[0]), Crop((h, w), top, left, flipped)


def clip_offset(item: Item, num_frames: int, frame_stride: int, gen: torch.Generator | None) -> int:
    """First frame of a clip: uniform over the valid starts (with ``gen``), else 0."""
    last = item.frames - ((num_frames - 1) * frame_stride + 1)
    if gen is None or last <= 0:
        return 0
    return int(torch.randint(last + 1, (), generator=gen))


def load_pixels(item: Item, size: tuple[int, int], gen: torch.Generator | None, num_frames: int = 0,
                frame_stride: int = 4, flip: bool = True, random_offset: bool = True):
    """(pixels in [-1, 1], crop): [3,h,w] for an image (or one frame of a video in image mode), [F,3,h,w] for a clip
    of ``num_frames`` frames ``frame_stride`` apart."""
    if item.video:
        if num_frames:
            start = clip_offset(item, num_frames, frame_stride, gen if random_offset else None)
            frames, _ = load_video(item.path, frame_load_cap=num_frames, skip_first_frames=start,
                                   select_every_nth=frame_stride)
            if len(frames) < num_frames:
                raise DataError(f"data: {item.path.name} gave {len(frames)} frames from frame {start}, need "
                                f"{num_frames}")
            x = frames.movedim(-1, 1)
        else:
            k = int(torch.randint(item.frames, (), generator=gen)) if gen is not None else 0
            frames, _ = load_video(item.path, frame_load_cap=1, skip_first_frames=k)
            x = frames[0].movedim(-1, 0)
    else:
        x = read_image(item.path).permute(2, 0, 1)
    pixels, crop = _cover_crop(x, size, gen, flip)
    return pixels * 2 - 1, crop


def read_image(path: Path, what: str = "data") -> torch.Tensor:
    """An image file as float RGB ``[H, W, 3]`` in 0..1 by the core's conversion (:func:`image_to_float`: EXIF
    orientation applied, 16-bit and float levels kept, ICC profiles to sRGB), transparent pixels placed on white
    as the app does; what the conversion mapped is logged once per file."""
    from PIL import Image

    with Image.open(path) as im:
        rgb, alpha, notices = image_to_float(im, f"{what} image {path.name}")
    if alpha is not None and float(alpha.min()) < 1.0:
        rgb = rgb * alpha[..., None] + (1.0 - alpha[..., None])
        notices.append(f"{path.name} has transparent pixels: they are placed on white")
    key = str(path)
    if notices and key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        for notice in notices:
            log.info("%s: %s", what, notice)
    return rgb


_ANNOUNCED: set[str] = set()


def cache_key(item: Item, size: tuple[int, int], extra: str) -> str:
    st = item.path.stat()
    raw = f"{item.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{size}|{extra}|v1"
    return hashlib.sha1(raw.encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------------------------------
# Workers

@dataclass(frozen=True)
class PixelSource:
    """Everything a worker needs to produce the pixels of a micro-step's batch (picklable, no models)."""
    items: tuple
    sampler: BucketSampler
    seed: int
    rank: int
    num_frames: int = 0
    frame_stride: int = 4
    random_offset: bool = True

    def sample(self, micro_step: int, position: int):
        """(pixels, crop) of sample ``position`` of the micro-step: the same wherever it is computed."""
        bucket, indices = self.sampler.batch(micro_step)
        return load_pixels(self.items[indices[position]], bucket, pixel_generator(self.seed, self.rank, micro_step,
                                                                                   position),
                           num_frames=self.num_frames, frame_stride=self.frame_stride,
                           random_offset=self.random_offset)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, source: PixelSource, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, k):
        micro_step = self.start + k
        out = []
        for position in range(len(self.source.sampler.indices(micro_step))):
            try:
                out.append(self.source.sample(micro_step, position))
            except Exception:  # the main process repeats it and raises the error itself (its own message)
                out.append(None)
        return out


def _as_is(batch):
    return batch


def _worker_init(_worker_id):
    """Stop signals are the trainer's: it finishes the step, writes a checkpoint and then shuts the workers down.
    Ctrl-C (SIGINT, sent to the terminal's whole process group) is ignored here; the first SIGTERM too (systemd,
    Slurm or ``kill -TERM -<group>`` signal every process of the run: a worker that died of it would make the
    DataLoader fail the step before the checkpoint). A second SIGTERM, e.g. the loader's own shutdown of a worker
    that does not answer, ends the worker as usual."""
    import signal

    def first_sigterm(_signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, first_sigterm)


class PixelPrefetcher:
    """The pixels of micro-steps ``start, start+1, ..., stop-1`` decoded and cropped by ``num_workers`` DataLoader
    processes ahead of the training loop (two batches per worker in flight). ``num_workers`` 0 computes each sample
    when it is asked for. A sample that failed in a worker is computed again here, so its error is raised with the
    same message as without workers."""

    def __init__(self, source: PixelSource, num_workers: int, stop: int):
        self.source, self.num_workers, self.stop = source, int(num_workers), int(stop)
        self._iter = None
        self._next = -1
        self._batch: tuple[int, list] | None = None

    def _open(self, start: int):
        self.close()
        loader = torch.utils.data.DataLoader(_Batches(self.source, start, self.stop), batch_size=None,
                                             num_workers=self.num_workers, collate_fn=_as_is,
                                             worker_init_fn=_worker_init, prefetch_factor=2)
        self._iter, self._next = iter(loader), start

    def sample(self, micro_step: int, position: int):
        """(pixels, crop) of sample ``position`` of ``micro_step``."""
        if self.num_workers == 0 or micro_step >= self.stop:
            return self.source.sample(micro_step, position)
        if self._batch is None or self._batch[0] != micro_step:
            if self._iter is None or micro_step != self._next:  # first use, a resume, or a step out of order
                self._open(micro_step)
            try:
                self._batch = (micro_step, next(self._iter))
            except RuntimeError as err:  # a worker died: a SIGTERM to the whole process group, the OOM killer
                log.warning("data: the loader workers stopped (%s); decoding in the training process from here",
                            str(err).splitlines()[0][:200])
                self.close()
                self.num_workers = 0  # every sample has its own generator, so the data stay exactly the same
                return self.source.sample(micro_step, position)
            self._next += 1
            if self._next >= self.stop:
                self.close()
        got = self._batch[1][position]
        return got if got is not None else self.source.sample(micro_step, position)

    def close(self):
        """Stop the workers (the DataLoader iterator shuts them down when released)."""
        self._iter = None
