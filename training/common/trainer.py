"""The trainer skeleton shared by STD and SiD-LSG: the loop, optimisers, precision, gradient sync, checkpoints,
exact resume, logs. The contract with a method is written down in :mod:`training.common.method`.

* accelerate for processes, devices and mixed precision; gradients of every optimiser are accumulated over
  ``grad_accum`` micro-steps and averaged across processes by an explicit all-reduce at the sync step (no DDP
  wrapper, so a UNet may be called several times per step with adapters switched on and off). Under fp16 each
  optimiser has its own gradient scaler; under bf16 and fp16 the trained tensors and their optimiser state are fp32;
* every random draw of a micro-step comes from a generator seeded with (seed, rank, micro-step), the data order is a
  function of the step, and the remaining RNG states are checkpointed, so ``--resume latest`` continues exactly;
* checkpoints hold the trainable tensors, optimiser/scheduler/scaler and RNG states, method state (e.g. the
  trajectory bank), the step and the resolved config, as safetensors + JSON (never pickles); they are written to a
  temporary folder and renamed, and old ones are deleted only after a new one is complete;
* the run folder holds ``config.json`` (the resolved options), ``train.log``, ``logs/`` (TensorBoard) and
  ``previews/``; a resume whose method-defining options differ from the checkpoint's is refused, naming them;
* Ctrl-C or SIGTERM finishes the step, writes a checkpoint and returns with ``interrupted`` set (the CLI exits 130
  or 143 with the resume command); a NaN/Inf loss stops the run before the optimiser step and names the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import platform
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from comfyui_std.core.errors import STDInputError
from std_hf.devices import bf16_supported, pick_device
from std_hf.weights import writable_folder
from training.common.config import as_dict, differing
from training.common.data import micro_step_generator
from training.common.precision import frozen_dtype
from training.common.state import (load_states, read_json, refuse_pickles, rng_state, save_states, set_rng_state,
                                   write_json)

log = logging.getLogger("training")


class NaNLossError(RuntimeError):
    pass


def cosine_with_warmup(optimizer, warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params, lr: float, use_8bit: bool, betas=(0.9, 0.999)):
    if use_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise STDInputError("use_8bit_adam", "needs bitsandbytes (pip install bitsandbytes); or set it to false "
                                                 "(AdamW keeps 8 bytes of state per trained parameter)") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0)


def _step_of(name: str) -> int | None:
    """The step of a checkpoint folder's name: ``checkpoint-N``, or ``.checkpoint-N.old`` (one set aside while a new
    checkpoint of the same step was put in place)."""
    core = name[1:-4] if name.startswith(".") and name.endswith(".old") else name
    head, _, step = core.partition("-")
    return int(step) if head == "checkpoint" and step.isdigit() else None


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A checkpoint set aside by :func:`install_checkpoint` counts only when
    its replacement never arrived (the process died between the two renames)."""
    if not folder.is_dir():
        return []
    found = {}
    for p in folder.iterdir():
        step = _step_of(p.name)
        if step is not None and p.is_dir() and (p / "state.json").exists():
            if step not in found or not p.name.startswith("."):
                found[step] = p
    return [found[s] for s in sorted(found)]


@contextlib.contextmanager
def held_signals():
    """SIGINT and SIGTERM wait until the block is done: inside it they are only recorded, and after it each one is
    raised again for the handlers that were in place (so Ctrl-C still stops the run, just not in the middle). Masking
    would not do: a process-directed signal goes to any thread that does not block it (torch has several), and
    Python runs its handler in the main thread all the same. Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: pending.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def install_checkpoint(tmp: Path, final: Path) -> None:
    """Put the complete checkpoint folder ``tmp`` in place as ``final``, never leaving a moment without a complete
    checkpoint of that step: one already at ``final`` (the same step saved again, e.g. a stop right after a
    scheduled checkpoint) is renamed aside first, the new one renamed in, and only then the old one deleted; the
    swap runs with SIGINT and SIGTERM held (:func:`held_signals`), and :func:`checkpoints` finds the one set aside
    if the process dies between the renames."""
    aside = final.with_name(f".{final.name}.old")
    with held_signals():
        if final.exists():
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)


def placement(asked: str, device: torch.device, world: int, given: torch.device) -> torch.device:
    """Where a process trains: ``device`` (what ``--device`` ``asked`` resolves to), never silently another one.

    One process honours any device; ``cuda:N`` also becomes the current CUDA device, so kernels and libraries that
    say "cuda" use GPU N too. With several processes accelerate has ``given`` each its own device, so only ``auto``
    or that device's type is accepted, and anything else is refused with a message.
    """
    if world > 1:
        if asked != "auto" and (torch.device(asked).index is not None or device.type != given.type):
            raise STDInputError("device", f"'{asked}' with {world} processes: accelerate gives each process its own "
                                          f"device (here {given}); use --device auto or {given.type}, and "
                                          "CUDA_VISIBLE_DEVICES to choose the GPUs")
        return given
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device.index)
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Trainer:
    def __init__(self, cfg, method_cls):
        from accelerate import Accelerator

        self.cfg = cfg
        device = pick_device(cfg.device)
        if device.type == "cpu" and cfg.mixed_precision == "fp16":
            raise STDInputError("mixed_precision", "fp16 needs a GPU; use bf16 or no on a CPU")
        self.out = writable_folder(cfg.output, "output")
        # processes from accelerate; mixed precision is this trainer's own autocast (accelerate keeps one
        # process-wide state, which cannot change between runs in one process)
        self.accelerator = Accelerator(cpu=device.type == "cpu")
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.device = placement(cfg.device, device, self.world, self.accelerator.device)
        if cfg.mixed_precision == "bf16" and not bf16_supported(self.device):
            # Turing/Pascal cards: fp16 autocast with a gradient scaler (the VAE stays fp32, the LoRA fp32)
            log.warning("%s has no bf16: training in fp16 with a gradient scaler instead (--mixed-precision fp16)",
                        torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device)
            cfg.mixed_precision = "fp16"
            if cfg.frozen_dtype == "bf16":
                cfg.frozen_dtype = "fp16"
            if cfg.vae_dtype == "bf16":
                cfg.vae_dtype = "fp32"
        self.method = method_cls(cfg, self)
        self.step = 0
        self.history: list[dict] = []
        self.writer = None
        self.stop_requested = False
        self.interrupted = False
        self.stop_signal = 0  # the signal that asked the run to stop (SIGINT or SIGTERM), 0 without one
        self.last_checkpoint: Path | None = None
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        self.phase_seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase of the step (``--time-phases``; the GPU is waited for at both ends, so the seconds are the
        phase's own); a no-op otherwise. Phases do not nest."""
        if not self.cfg.time_phases:
            yield
            return
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - start

    def _stop_everywhere(self) -> bool:
        """Whether any process was asked to stop (one tiny all-reduce a step with several processes): every rank
        must stop at the same step, or one waits at the checkpoint barrier while the others wait in the gradient
        all-reduce."""
        if self.world > 1:
            flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.accelerator.device)
            self.stop_requested = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return self.stop_requested

    def request_stop(self, signum=signal.SIGINT, _frame=None):
        """Finish the current step, write a checkpoint and return (Ctrl-C or SIGTERM does this; a second Ctrl-C
        aborts). ``stop_signal`` keeps which one, for the exit code (130 or 143)."""
        self.stop_requested = True
        self.stop_signal = int(signum)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning("%s: stopping after this step (Ctrl-C again aborts without a checkpoint)",
                    signal.Signals(signum).name)

    # -- helpers for methods ---------------------------------------------------------------------------------
    def generator(self, micro_step: int, salt: int = 0) -> torch.Generator:
        return micro_step_generator(self.cfg.seed, self.rank, micro_step, salt)

    def in_turn(self, fn):
        """``fn()`` run by one rank after another (each waits for the ranks before it): several processes reading
        the base model at once would each hold a full copy in host RAM (6.6 GiB for SDXL in bf16) at the same
        time. One process just runs it."""
        result = None
        for rank in range(self.world):
            if rank == self.rank:
                result = fn()
            if self.world > 1:
                self.accelerator.wait_for_everyone()
        return result

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def weight_dtype(self) -> torch.dtype:
        return frozen_dtype(self.cfg)

    def autocast(self):
        """bf16/fp16 autocast for the forward passes (the losses are fp32; off for --mixed-precision no)."""
        mixed = self.cfg.mixed_precision
        dtype = torch.bfloat16 if mixed == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=mixed != "no")

    # -- run folder ------------------------------------------------------------------------------------------
    def _config_record(self) -> dict:
        import diffusers

        return {"method": self.method.name, "options": as_dict(self.cfg),
                "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                             "python": platform.python_version()}}

    def _check_output_folder(self) -> None:
        """Warn when --output already holds another run (or checkpoints of this one that a fresh start ignores)."""
        cfg_file = self.out / "config.json"
        found = checkpoints(self.ckpt_dir)
        if cfg_file.exists():
            saved = read_json(cfg_file, "output")
            diff = differing(saved.get("options", {}), self.cfg) if saved.get("method") == self.method.name else \
                [f"method {saved.get('method')!r} -> {self.method.name!r}"]
            if diff:
                log.warning("output %s already holds a different run (%s); its checkpoints and exported files will "
                            "be mixed with this one's: use a new --output to keep them apart", self.out,
                            "; ".join(diff[:4]))
                return
        if found:
            log.warning("output %s already holds checkpoints (latest %s); this run starts over (pass --resume latest "
                        "to continue instead)", self.out, found[-1].name)

    # -- checkpoints -----------------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def _trainable_digest(self) -> str:
        digest = hashlib.sha256()
        for k, v in sorted(self.method.trainable_state().items()):
            digest.update(k.encode())
            digest.update(v.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()

    def save_checkpoint(self) -> Path:
        final = self.ckpt_dir / f"checkpoint-{self.step}"
        tmp = self.ckpt_dir / f".checkpoint-{self.step}.tmp"
        self.accelerator.wait_for_everyone()
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.method.trainable_state().items()}
            save_file(tensors, str(tmp / "trainable.safetensors"))
            save_states(tmp, "optimizers", {
                name: {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                       "scaler": self.scalers[name].state_dict() if name in self.scalers else None}
                for name, (opt, sched, _) in self.optimizers.items()})
            write_json(tmp / "config.json", self._config_record())
        save_states(tmp, f"rng-rank{self.rank}", rng_state())
        self.method.save_state(tmp, self.rank)  # per-rank state (e.g. banks) from every process
        write_json(tmp / f"rank{self.rank}.json", {"rank": self.rank, "trainable_sha256": self._trainable_digest(),
                                                    "step": self.step})
        self.accelerator.wait_for_everyone()
        if self.is_main:
            write_json(tmp / "state.json", {"step": self.step, "method": self.method.name, "world": self.world,
                                            "history": self.history[-1000:]})
            install_checkpoint(tmp, final)
            for old in checkpoints(self.ckpt_dir)[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = final
        return final

    def find_checkpoint(self, spec: str) -> Path:
        if spec == "latest":
            found = checkpoints(self.ckpt_dir)
            if not found:
                raise STDInputError("resume", f"no checkpoint in {self.ckpt_dir}")
            return found[-1]
        path = Path(spec).expanduser()
        if not (path / "state.json").exists():
            raise STDInputError("resume", f"{path} is not a checkpoint folder (no state.json)")
        return path

    def check_checkpoint(self, path: Path) -> dict:
        """Refuse pickles, another method, another world size or other method-defining options."""
        refuse_pickles(path)
        state = read_json(path / "state.json")
        if state.get("method") != self.method.name:
            raise STDInputError("resume", f"{path} is a {state.get('method')} checkpoint, not {self.method.name}")
        if int(state.get("world", 1)) != self.world:
            raise STDInputError("resume", f"{path} was written by {state.get('world')} processes, this run has "
                                          f"{self.world}: resume with the same number of processes")
        if not (path / "config.json").exists():
            raise STDInputError("resume", f"{path} has no config.json (written by an older version); start anew")
        saved = read_json(path / "config.json").get("options", {})
        diff = differing(saved, self.cfg)
        if diff:
            raise STDInputError("resume", f"{path.name} was trained with other settings: {'; '.join(diff)}. "
                                          "Options that define the method must match to continue; start a new "
                                          "--output to train with them")
        return state

    def load_checkpoint(self, spec: str) -> Path:
        path = self.find_checkpoint(spec)
        state = self.check_checkpoint(path)
        try:
            trainable = load_file(str(path / "trainable.safetensors"))
        except Exception as err:  # missing or corrupt file: safetensors raises several types
            raise STDInputError("resume", f"{path}/trainable.safetensors is not readable ({err})") from None
        self.method.load_trainable_state(trainable)
        saved = load_states(path, "optimizers")
        for name, (opt, sched, _) in self.optimizers.items():
            if name not in saved:
                raise STDInputError("resume", f"{path} has no state for the {name} optimiser")
            opt.load_state_dict(saved[name]["optimizer"])
            sched.load_state_dict(saved[name]["scheduler"])
            if name in self.scalers and saved[name]["scaler"] is not None:
                self.scalers[name].load_state_dict(saved[name]["scaler"])
        self.method.load_state(path, self.rank)
        set_rng_state(load_states(path, f"rng-rank{self.rank}"))
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        return path

    # -- the loop --------------------------------------------------------------------------------------------
    def _sync_and_step(self, names=None):
        for name, (opt, sched, clip) in self.optimizers.items():
            if names is not None and name not in names:
                continue
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if self.world > 1:
                for p in params:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
            scaler = self.scalers.get(name)
            if scaler is not None:
                scaler.unscale_(opt)
            if clip and params:
                torch.nn.utils.clip_grad_norm_(params, clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

    def _build_optimizers(self):
        cfg = self.cfg
        self.optimizers = {}
        for name, (params, lr, clip) in self.method.param_groups().items():
            params = list(params)
            if not params:
                continue
            wrong = [p.dtype for p in params if p.dtype != torch.float32]
            if wrong:
                raise RuntimeError(f"the {name} parameters must be fp32 (found {wrong[0]})")
            betas = getattr(self.method, "adam_betas", (0.9, 0.999))
            opt = make_optimizer(params, lr, cfg.use_8bit_adam, betas)
            self.optimizers[name] = (opt, cosine_with_warmup(opt, cfg.lr_warmup, cfg.max_steps), clip)
            if cfg.mixed_precision == "fp16":
                self.scalers[name] = torch.amp.GradScaler(self.device.type)

    def _backward(self, name: str, loss: torch.Tensor):
        scaled = loss / self.cfg.grad_accum
        scaler = self.scalers.get(name)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()

    def _log_handler(self):
        if not self.is_main:
            return None
        handler = logging.FileHandler(self.out / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("training")
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        return handler

    def run(self) -> list[dict]:
        handler = self._log_handler()
        try:
            return self._run()
        finally:
            close = getattr(self.method, "close", None)
            if close is not None:
                close()
            if handler is not None:
                logging.getLogger("training").removeHandler(handler)
                handler.close()

    def _run(self) -> list[dict]:
        cfg = self.cfg
        if not cfg.resume:
            self._check_output_folder()
        self.method.setup()
        self._build_optimizers()
        if cfg.resume:
            path = self.load_checkpoint(cfg.resume)
            log.info("resumed from %s at step %d", path, self.step)
        if self.is_main:
            write_json(self.out / "config.json", self._config_record())
            log.info("run folder %s: config.json, train.log, checkpoints/, logs/, previews/", self.out)
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out / "logs"))
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.is_main, desc=self.method.name,
                   dynamic_ncols=True)
        last_good = checkpoints(self.ckpt_dir)[-1] if checkpoints(self.ckpt_dir) else None
        previous_term = None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.request_stop)
            previous_term = signal.signal(signal.SIGTERM, self.request_stop)
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                logs: dict[str, float] = {}
                # a method updates its optimisers in phases (SiD-LSG: fake score, then generator); STD has one
                for phase in getattr(self.method, "phases", (None,)):
                    for micro in range(cfg.grad_accum):
                        micro_step = self.step * cfg.grad_accum + micro
                        steps = (self.method.micro_step(micro_step) if phase is None
                                 else self.method.micro_step(micro_step, phase))
                        with self.autocast():
                            for name, loss, extra in steps:
                                if not torch.isfinite(loss):
                                    raise NaNLossError(f"the {name} loss became {loss.item()} at step {self.step}")
                                with self.phase("backward"):
                                    self._backward(name, loss)
                                logs[f"loss/{name}"] = logs.get(f"loss/{name}", 0.0) + loss.item() / cfg.grad_accum
                                for k, v in extra.items():
                                    logs[k] = float(v)
                    with self.phase("optimizer"):
                        self._sync_and_step(None if phase is None else [phase])
                with self.phase("optimizer"):
                    self.method.after_optimizer_step()
                self.step += 1
                logs["time/step_s"] = time.perf_counter() - t0
                logs.update({f"time/{k}_s": v for k, v in self.phase_seconds.items()})
                self.phase_seconds = {}
                self.history.append({"step": self.step, **{k: v for k, v in logs.items() if k.startswith("loss/") or
                                                           (cfg.time_phases and k.startswith("time/"))}})
                bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss/")})
                bar.update(1)
                if self.writer and (self.step % max(1, cfg.log_every) == 0 or self.step == cfg.max_steps):
                    for k, v in logs.items():
                        self.writer.add_scalar(k, v, self.step)
                    for name, (opt, _, _) in self.optimizers.items():
                        self.writer.add_scalar(f"lr/{name}", opt.param_groups[0]["lr"], self.step)
                if self.step % max(1, cfg.log_every) == 0:
                    log.info("step %d/%d %s", self.step, cfg.max_steps, " ".join(
                        f"{k}={v:.5g}" for k, v in sorted(logs.items())))
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                    last_good = self.save_checkpoint()
                if cfg.preview_every and self.step % cfg.preview_every == 0 and self.step < cfg.max_steps and \
                        self.is_main:
                    self.write_preview()
                if cfg.export_every and self.step % cfg.export_every == 0 and self.is_main:
                    self._export(suffix=f"-step{self.step}")
                if self._stop_everywhere():
                    path = self.save_checkpoint()
                    log.warning("stopped at step %d; checkpoint %s; continue with --resume latest", self.step, path)
                    self.interrupted = True
                    return self.history
        except NaNLossError as err:
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
            raise NaNLossError(f"{err}; stopped before the optimiser step, {where} (nothing after it was "
                               "written). Lower the learning rate, use bf16/fp32, or check the data.") from None
        finally:
            bar.close()
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, previous_term if previous_term is not None else signal.SIG_DFL)
            if self.writer and (self.interrupted or self.step < cfg.max_steps):
                self.writer.close()
        self.save_checkpoint()
        if self.is_main:
            self.write_preview()
            for p in self._export():
                log.info("exported %s", p)
        if self.writer:
            self.writer.close()
        self.accelerator.wait_for_everyone()
        return self.history

    def _export(self, suffix: str = "") -> list[Path]:
        """The method's result files (written atomically and world-readable by training.common.export)."""
        return self.method.export(self.out, suffix=suffix)

    def write_preview(self):
        image = self.method.preview()
        if image is None:
            return
        folder = self.out / "previews"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"step-{self.step:06d}.png")
        log.info("preview %s", folder / f"step-{self.step:06d}.png")
        if self.writer:
            import numpy as np
            self.writer.add_image("preview", np.asarray(image).transpose(2, 0, 1), self.step)
