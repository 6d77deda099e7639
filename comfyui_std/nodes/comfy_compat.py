"""What differs between the ComfyUI versions the pack supports (0.3.48 to 0.33), in one place.

The nodes call these helpers instead of testing versions themselves. Each entry says which ComfyUI changed what:

* Trimmed core VIDEOs (0.14, the Video Slice node): a ``VideoFromFile`` carries a start time and a duration
  (``get_active_trim_window()``) but ``get_stream_source()`` still names the whole file, so a reader of the stream
  source must apply the window itself. Older hosts have no window: the whole file is the video.
* Dropdown values (0.8): ComfyUI refuses a V3 ``Combo`` value that is not in its options before the node runs,
  unless the node declares a ``validate_inputs`` classmethod whose arguments name that input (honoured from 0.3.48
  on). The nodes whose dropdowns name files (``lora_name``, ``ipadapter_file``, ``folder``, ``video``) declare one
  that accepts every value, because they check the value themselves when they run, with the pack's own message
  (the same whether or not a foreign name exists) and so that ``video`` may be empty when ``path`` or ``source``
  is given. :data:`OWN_CHECK` is what those methods return.
"""

from __future__ import annotations


def trim_window(video) -> tuple[float, float]:
    """``(start, duration)`` in seconds of a core VIDEO's trim window; ``(0, 0)`` (the whole file) where the host
    or the VIDEO has none. A negative start (counted from the end) is resolved by ComfyUI's own method."""
    get = getattr(video, "get_active_trim_window", None)
    if get is None:
        return 0.0, 0.0
    start, duration = get()
    return float(start), float(duration)


#: what a node's ``validate_inputs`` returns for the dropdowns it checks itself when it runs
OWN_CHECK = True
