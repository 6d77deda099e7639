"""The one command-line runner of the trainers and tools: parse, run, and answer every problem with a message.

Exit codes: 0 done; 2 ``error: ...`` for bad options, files, paths or data (never a traceback); 3 a NaN/Inf loss
(the message names the last good checkpoint); 130 interrupted (Ctrl-C: a checkpoint is written first when training
had started, and the message says how to continue); 1 a check that found a problem (``training.check_base``).
"""

from __future__ import annotations

import logging
import shlex
import sys


log = logging.getLogger("training")
#: what counts as the user's problem: bad settings (STDInputError is a ValueError), files that are not there or
#: cannot be written (OSError: permissions, a file where a folder should be, a full disk)
USER_ERRORS = (ValueError, OSError)


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _os_message(err: OSError) -> str:
    where = f" {err.filename}" if getattr(err, "filename", None) else ""
    return f"{err.strerror or type(err).__name__}:{where}" if err.strerror else str(err)


def guarded(fn, *args, **kwargs) -> int:
    """Call ``fn`` and turn user problems into ``error: ...`` (exit 2) and Ctrl-C into exit 130."""
    from training.common.trainer import NaNLossError
    from training.std.bank import BankDiskFullError

    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except NaNLossError as err:
        return fail(str(err), 3)
    except BankDiskFullError as err:
        return fail(str(err))
    except OSError as err:
        return fail(_os_message(err))
    except ValueError as err:
        return fail(str(err))


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

    def run() -> int:
        cfg = config_from_argv(config_cls, presets, argv, prog, description)
        trainer = Trainer(cfg, method_cls)
        trainer.run()
        if trainer.interrupted:
            print(f"interrupted at step {trainer.step}: checkpoint {trainer.last_checkpoint} written. Continue "
                  f"with:\n  {resume_command(prog, argv)}", file=sys.stderr)
            return 130
        return 0

    return guarded(run)
