"""The trained LoRA adapters of both methods: seeded creation, fp32 parameters, their factors for export."""

from __future__ import annotations

import torch

from std_hf.lora import LoraLayer


def add_lora(unet, adapter_name: str, rank: int, alpha: float, targets: list[str], seed: int,
             exclude_motion_proj: bool = False) -> list[tuple[str, torch.nn.Parameter]]:
    """Add a PEFT LoRA adapter on every module whose name ends with one of ``targets``.

    The initialisation (PEFT's "gaussian": ``lora_A ~ N(0, 1/r²)``, ``lora_B = 0``) is drawn in fp32 from a generator
    seeded with ``seed``, so two runs with the same seed start from the same LoRA whatever ran before and whatever
    the frozen weights' dtype (PEFT would create it in the base layer's dtype, rounding a bf16 base's draws); the
    adapter's parameters are fp32, so bf16/fp16 training keeps the LoRA and its optimiser state in fp32. ``exclude_motion_proj``: diffusers' motion
    transformers call ``proj_in``/``proj_out`` with a keyword argument PEFT's LoRA layers do not accept, so those two
    projections inside motion modules get no LoRA.
    """
    from peft import LoraConfig

    names = "|".join(t.replace(".", r"\.") for t in targets)
    pattern = (rf"^(?!.*motion_modules.*\.proj_(?:in|out)$).*\.({names})$" if exclude_motion_proj
               else rf".*\.({names})$")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=pattern),
                         adapter_name=adapter_name)
    params = adapter_params(unet, adapter_name)
    if not params:
        raise RuntimeError("no trainable LoRA parameters: check lora_targets")
    g = torch.Generator().manual_seed(seed)
    for name, p in params:
        init = torch.randn(p.shape, generator=g) / rank if ".lora_A." in name else torch.zeros(p.shape)
        p.data = init.to(p.device)
    return params


def adapter_params(unet, adapter_name: str) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in unet.named_parameters() if f".{adapter_name}." in n and ".lora_" in n]


def adapter_layers(unet, adapter_name: str) -> dict[tuple[str, str], LoraLayer]:
    """The adapter's factors per UNet module, its strength (PEFT's ``scaling``: alpha / rank) folded into ``up``."""
    out = {}
    for name, module in unet.named_modules():
        a = getattr(module, "lora_A", None)
        if not isinstance(a, torch.nn.ModuleDict) or adapter_name not in a:
            continue
        down = a[adapter_name].weight.detach().float()
        up = module.lora_B[adapter_name].weight.detach().float()
        out[("unet", name)] = LoraLayer(down, up * float(module.scaling[adapter_name]))
    return out
