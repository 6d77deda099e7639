"""The trainer skeleton shared by STD and SiD-LSG: the loop, optimisers, gradient sync, checkpoints, resume, logs.

A *method* (``training.std.method.STDMethod``, …) owns models, losses and method state; the skeleton owns everything
else and is the same for all methods:

* accelerate for processes, devices and mixed precision; gradients of every optimiser are accumulated over
  ``grad_accum`` micro-steps and averaged across processes by an explicit all-reduce at the sync step (no DDP
  wrapper, so a UNet may be called several times per step with adapters switched on and off);
* every random draw of a micro-step comes from a generator seeded with (seed, rank, micro-step), so runs are
  reproducible and ``--resume latest`` continues exactly (the data order is a function of the step as well);
* checkpoints hold only trainable tensors, optimiser/scheduler state, method state (e.g. the trajectory bank) and
  the step; they are written to a temporary folder and renamed, and old ones are deleted only after a new one is
  complete, so an interruption never loses the last good checkpoint;
* a NaN/Inf loss stops the run before the optimiser step and names the last good checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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
            return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=0.0)
        except ImportError:
            log.warning("use_8bit_adam: bitsandbytes is not installed; using torch AdamW")
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0)


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
             and p.name.split("-")[1].isdigit() and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class Trainer:
    def __init__(self, cfg, method_cls):
        from accelerate import Accelerator

        self.cfg = cfg
        self.out = Path(cfg.output)
        self.out.mkdir(parents=True, exist_ok=True)
        cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision if not cpu else "no")
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.method = method_cls(cfg, self)
        self.step = 0
        self.history: list[dict] = []
        self.writer = None
        self.stop_requested = False
        self.interrupted = False

    def request_stop(self, *_):
        """Finish the current step, write a checkpoint and return (Ctrl-C does this; a second Ctrl-C aborts)."""
        self.stop_requested = True
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)

    # -- helpers for methods ---------------------------------------------------------------------------------
    def generator(self, micro_step: int, salt: int = 0) -> torch.Generator:
        seed = (self.cfg.seed * 1_000_003 + self.rank * 7_919 + micro_step * 104_729 + salt) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # -- checkpoints -----------------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

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
            torch.save({name: (opt.state_dict(), sched.state_dict()) for name, (opt, sched, _) in
                        self.optimizers.items()}, tmp / "optimizers.pt")
        self.method.save_state(tmp, self.rank)  # per-rank state (e.g. banks) from every process
        digest = hashlib.sha256()
        for k, v in sorted(self.method.trainable_state().items()):
            digest.update(k.encode())
            digest.update(v.detach().float().cpu().numpy().tobytes())
        (tmp / f"rank{self.rank}.json").write_text(json.dumps({"rank": self.rank, "trainable_sha256":
                                                                digest.hexdigest(), "step": self.step}))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "method": self.method.name,
                                                         "world": self.world, "history": self.history[-1000:]}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in checkpoints(self.ckpt_dir)[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, spec: str) -> Path:
        if spec == "latest":
            found = checkpoints(self.ckpt_dir)
            if not found:
                raise FileNotFoundError(f"resume: no checkpoint in {self.ckpt_dir}")
            path = found[-1]
        else:
            path = Path(spec)
            if not (path / "state.json").exists():
                raise FileNotFoundError(f"resume: {path} is not a checkpoint folder (no state.json)")
        state = json.loads((path / "state.json").read_text())
        if state.get("method") != self.method.name:
            raise ValueError(f"resume: {path} is a {state.get('method')} checkpoint, not {self.method.name}")
        self.method.load_trainable_state(load_file(str(path / "trainable.safetensors")))
        opts = torch.load(path / "optimizers.pt", weights_only=False)
        for name, (opt, sched, _) in self.optimizers.items():
            opt.load_state_dict(opts[name][0])
            sched.load_state_dict(opts[name][1])
        self.method.load_state(path, self.rank)
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
            if clip and params:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

    def run(self) -> list[dict]:
        cfg = self.cfg
        self.method.setup()
        self.optimizers = {}
        for name, (params, lr, clip) in self.method.param_groups().items():
            params = list(params)
            if not params:
                continue
            betas = getattr(self.method, "adam_betas", (0.9, 0.999))
            opt = make_optimizer(params, lr, cfg.use_8bit_adam, betas)
            self.optimizers[name] = (opt, cosine_with_warmup(opt, cfg.lr_warmup, cfg.max_steps), clip)
        if cfg.resume:
            path = self.load_checkpoint(cfg.resume)
            log.info("resumed from %s at step %d", path, self.step)
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out / "logs"))
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.is_main, desc=self.method.name,
                   dynamic_ncols=True)
        last_good = checkpoints(self.ckpt_dir)[-1] if checkpoints(self.ckpt_dir) else None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.request_stop)
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
                        with self.accelerator.autocast():
                            for name, loss, extra in steps:
                                if not torch.isfinite(loss):
                                    raise NaNLossError(f"the {name} loss became {loss.item()} at step {self.step}")
                                (loss / cfg.grad_accum).backward()
                                logs[f"loss/{name}"] = logs.get(f"loss/{name}", 0.0) + loss.item() / cfg.grad_accum
                                for k, v in extra.items():
                                    logs[k] = float(v)
                    self._sync_and_step(None if phase is None else [phase])
                self.method.after_optimizer_step()
                self.step += 1
                logs["time/step_s"] = time.perf_counter() - t0
                self.history.append({"step": self.step, **{k: v for k, v in logs.items() if k.startswith("loss/")}})
                bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss/")})
                bar.update(1)
                if self.writer and (self.step % max(1, cfg.log_every) == 0 or self.step == cfg.max_steps):
                    for k, v in logs.items():
                        self.writer.add_scalar(k, v, self.step)
                    for name, (opt, _, _) in self.optimizers.items():
                        self.writer.add_scalar(f"lr/{name}", opt.param_groups[0]["lr"], self.step)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                    last_good = self.save_checkpoint()
                if cfg.preview_every and self.step % cfg.preview_every == 0 and self.is_main:
                    self.write_preview()
                if cfg.export_every and self.step % cfg.export_every == 0 and self.is_main:
                    self.method.export(self.out, suffix=f"-step{self.step}")
                if self.stop_requested:
                    path = self.save_checkpoint()
                    log.warning("stopped at step %d; continue with --resume latest (%s)", self.step, path)
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
        self.save_checkpoint()
        if self.is_main:
            self.write_preview()
            paths = self.method.export(self.out)
            for p in paths:
                log.info("exported %s", p)
        if self.writer:
            self.writer.close()
        self.accelerator.wait_for_everyone()
        return self.history

    def write_preview(self):
        image = self.method.preview()
        if image is None:
            return
        folder = self.out / "previews"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"step-{self.step:06d}.png")
        if self.writer:
            import numpy as np
            self.writer.add_image("preview", np.asarray(image).transpose(2, 0, 1), self.step)
