"""Tensors a user supplies (a latent, an IP-Adapter, a motion module; LoRAs add their own pairing rules in
:mod:`.lora_format`): checked once, before use, for what would silently spoil every output.

A NaN or inf value turns every output it touches into NaN, and an integer tensor loaded into a float weight is
converted without a word; both are refused with a message naming the input and the tensor.
"""

from __future__ import annotations

import torch

from .errors import STDInputError

def is_float(tensor: torch.Tensor) -> bool:
    """A floating-point tensor (fp8 storage included: it is dequantised to the model's dtype when loaded)."""
    return tensor.dtype.is_floating_point


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many values of a floating tensor are NaN or inf (0 for other dtypes)."""
    if not tensor.dtype.is_floating_point or tensor.device.type == "meta":
        return 0
    if tensor.element_size() == 1:  # fp8: torch has no isfinite for it
        tensor = tensor.to(torch.float16)
    return int((~torch.isfinite(tensor)).sum())


def check_tensor(name: str, tensor, what: str = "tensor") -> torch.Tensor:
    """``tensor`` if it is a float tensor without NaN or inf; else :class:`STDInputError` naming ``name``."""
    if not isinstance(tensor, torch.Tensor):
        raise STDInputError(name, f"expected a {what} (a tensor), got {type(tensor).__name__}")
    if not is_float(tensor):
        raise STDInputError(name, f"the {what} is {str(tensor.dtype).replace('torch.', '')}; expected a float tensor")
    bad = nonfinite_count(tensor)
    if bad:
        raise STDInputError(name, f"the {what} holds {bad} non-finite value(s) (NaN or inf) of {tensor.numel()}; "
                                  "every result would be NaN. Check the node or file that made it")
    return tensor


def check_weights(state_dict: dict, name: str, file: str = "") -> None:
    """Every tensor of a weights file (nested dicts included) a float tensor without NaN or inf; else
    :class:`STDInputError` naming ``name``, the ``file`` (when given) and the first bad tensor."""
    where = f"'{file}': " if file else ""
    for key, value in state_dict.items():
        if isinstance(value, dict):
            check_weights({f"{key}.{k}": v for k, v in value.items()}, name, file)
            continue
        if not isinstance(value, torch.Tensor):
            continue
        if not is_float(value):
            raise STDInputError(name, f"{where}{key} is {str(value.dtype).replace('torch.', '')}; the weights "
                                      "must be float tensors (fp8, fp16, bf16 or fp32)")
        bad = nonfinite_count(value)
        if bad:
            raise STDInputError(name, f"{where}{key} holds {bad} non-finite value(s) (NaN or inf); the file is "
                                      "damaged")
