"""Errors raised by the STD core, and one way to keep server paths out of what a client is told.

Every front end (ComfyUI nodes, the Gradio app, the trainer CLI) catches :class:`STDInputError`
and shows its message as is, so messages name the offending input and the allowed range.
"""


import re

# an absolute path: POSIX with at least two parts, or Windows (C:\..., \\server\...); not a URL's //host/...
_ABS_PATH = re.compile(r"(?<![\w.:/\\])(?:/[^\s'\":,;()\[\]]+){2,}|\b[A-Za-z]:\\[^\s'\":,;()]+|\\\\[^\s'\":,;()]+")


def redact_paths(message: str) -> str:
    """``message`` with every absolute file path replaced by its last part (``/srv/comfy/input/a.mp4`` -> ``a.mp4``).

    Errors from FFmpeg, Pillow and the OS quote full paths; what reaches a client of the ComfyUI server or of the app
    must not reveal the server's folders."""
    return _ABS_PATH.sub(lambda m: re.split(r"[/\\]", m.group(0).rstrip("/\\"))[-1] or m.group(0), message)


class STDInputError(ValueError):
    """A user-supplied setting is out of range or inconsistent.

    The message is meant for end users: it names the input, the value received and what is allowed.
    """

    def __init__(self, name: str, message: str):
        self.input_name = name
        super().__init__(f"{name}: {message}")


def check_range(name: str, value, low, high, *, low_open: bool = False, high_open: bool = False, kind=float):
    """Validate ``low <= value <= high`` (with optional open ends) and the value's type.

    Returns the value converted to ``kind``. Raises :class:`STDInputError` with a message such as
    ``start_strength: got 1.5, allowed range is (0, 1]``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value, float) and not float(value).is_integer()):
        raise STDInputError(name, f"expected {'an integer' if kind is int else 'a number'}, got {value!r} ({type(value).__name__})")
    allowed = f"allowed range is {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if value != value:  # NaN
        raise STDInputError(name, f"got NaN, {allowed}")
    value = kind(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        raise STDInputError(name, f"got {value}, {allowed}")
    return value


def check_bool(name: str, value) -> bool:
    """A yes/no input: ``True`` or ``False`` (a string such as ``"no"`` is not silently true). Raises
    :class:`STDInputError` naming the input."""
    if isinstance(value, bool):
        return value
    raise STDInputError(name, f"expected true or false, got {value!r}")
