"""The one command-line runner of the trainers and tools: parse, run, and answer every problem with a message.

Exit codes: 0 done; 2 ``error: ...`` for the user's problems: bad options, files, paths or data
(:class:`~comfyui_std.core.errors.STDInputError`, the trainer's data and disk errors, a full disk or a path this
process may not write), never a traceback; 3 a NaN/Inf loss (the message names the last good checkpoint); 130
interrupted (Ctrl-C: a checkpoint is written first when training had started, and the message says how to continue)
and 143 terminated (SIGTERM, the same way);
1 a check that found a problem (``training.check_base``), or an internal error: anything else is a bug, whose
traceback goes to stderr and to the run's ``train.log``, followed by a one-line ``error: internal error ...`` that
points to it.
"""

from __future__ import annotations

import errno
import logging
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

log = logging.getLogger("training")
#: OSError numbers that are the machine's state, not the program's: a full disk or quota, a read-only file system,
#: no permission to a path the user gave
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _os_message(err: OSError) -> str:
    where = f" {err.filename}" if getattr(err, "filename", None) else ""
    return f"{err.strerror or type(err).__name__}:{where}" if err.strerror else str(err)


def user_error(err: BaseException) -> str | None:
    """The message for an error that is the user's to fix (exit 2), or None for anything else (a bug)."""
    from comfyui_std.core.errors import STDInputError
    from training.common.errors import TrainingUserError

    if isinstance(err, (STDInputError, TrainingUserError)):
        return str(err)
    if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
        return _os_message(err)
    return None


def internal_error(err: BaseException, log_file: Path | None) -> int:
    """A bug: the traceback to stderr and ``log_file`` (when its folder exists), then one line pointing to it;
    exit 1."""
    text = "".join(traceback.format_exception(err))
    print(text, file=sys.stderr, end="")
    kept = None
    if log_file is not None and Path(log_file).parent.is_dir():
        try:
            with open(log_file, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR training: internal error\n{text}")
            kept = log_file
        except OSError:
            pass
    first = (str(err).strip().splitlines() or [""])[0]
    where = f"above and in {kept}" if kept else "above"
    print(f"error: internal error ({type(err).__name__}: {first}); this is a bug, please report it with the "
          f"traceback ({where})", file=sys.stderr)
    return 1


def guarded(fn, *args, log_file: Callable[[], Path | None] | None = None, **kwargs) -> int:
    """Call ``fn`` and turn its problems into exit codes (see the module docstring): the user's into
    ``error: ...`` (exit 2), a bug into its traceback (also appended to ``log_file()``, the run's train.log) and
    exit 1, Ctrl-C into exit 130."""
    from comfyui_std.core.exits import Stopped, stop_on_signals
    from training.common.trainer import NaNLossError

    try:
        with stop_on_signals():  # outside the training loop (loading, exporting); the loop takes the signals over
            return fn(*args, **kwargs)
    except Stopped as stop:
        print("terminated (SIGTERM)" if stop.signum == signal.SIGTERM else "interrupted", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except NaNLossError as err:
        return fail(str(err), 3)
    except Exception as err:  # noqa: BLE001 -- sorted into the user's problems and bugs right here
        message = user_error(err)
        if message is not None:
            return fail(message)
        return internal_error(err, log_file() if log_file is not None else None)


def resume_command(prog: str, argv: list[str]) -> str:
    """The command that continues an interrupted run: the same options with ``--resume latest``."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if not a.startswith("--resume="):
            kept.append(a)
    return " ".join([prog, *(shlex.quote(a) for a in kept), "--resume", "latest"])


def train(method_cls, config_cls, presets: dict, argv, prog: str, description: str) -> int:
    """``python -m training.<method>``: resolve the options, train, export; see the module docstring for exits."""
    from training.common.config import config_from_argv
    from training.common.trainer import Trainer

    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)

    where: dict[str, Path] = {}

    def run() -> int:
        cfg = config_from_argv(config_cls, presets, argv, prog, description)
        where["log"] = Path(cfg.output).expanduser() / "train.log"
        trainer = Trainer(cfg, method_cls)
        trainer.run()
        if trainer.interrupted:
            how = "terminated (SIGTERM)" if trainer.stop_signal == signal.SIGTERM else "interrupted"
            print(f"{how} at step {trainer.step}: checkpoint {trainer.last_checkpoint} written. Continue "
                  f"with:\n  {resume_command(prog, argv)}", file=sys.stderr)
            return 143 if trainer.stop_signal == signal.SIGTERM else 130
        return 0

    return guarded(run, log_file=lambda: where.get("log"))
