"""How a run was made, read off the pipeline object and the call: the `runs` provenance columns (schema 1.5).

Pipeline class, scheduler class and config, the UNet's active LoRA adapters and their weights, ControlNet
model classes, img2img strength and the init image's hash, so a run recorded from a user's notebook is
explainable (and, with its seed, regenerable) later.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image


def _jsonable(value: object) -> object:
    """JSON for config values diffusers keeps as numpy arrays, tuples or other objects."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def scheduler_config_json(scheduler: object) -> str:
    """The scheduler's config as sorted JSON (enough to rebuild it with `from_config`)."""
    return json.dumps(dict(scheduler.config), default=_jsonable, sort_keys=True)


def lora_adapters(pipe: object) -> tuple[list[str], list[float]]:
    """Active LoRA adapters of the pipeline's UNet and each one's weight (as `set_adapters` set it)."""
    unet = pipe.unet
    names: list[str] = []
    for module in unet.modules():
        active = getattr(module, "active_adapters", None)
        if isinstance(getattr(module, "scaling", None), dict) and active:
            names = [a for a in active if a in module.scaling]
            layer = module
            break
    else:
        return [], []
    scales = []
    for name in names:
        r, alpha = layer.r[name], layer.lora_alpha[name]
        base = alpha / math.sqrt(r) if getattr(layer, "use_rslora", {}).get(name) else alpha / r
        scales.append(float(layer.scaling[name] / base))
    return names, scales


def controlnet_classes(pipe: object) -> str | None:
    """ControlNet model class name(s), comma-separated, or None."""
    net = getattr(pipe, "controlnet", None)
    if net is None:
        return None
    nets = getattr(net, "nets", None)
    return ",".join(type(n).__name__ for n in nets) if nets is not None else type(net).__name__


def image_sha256(image: object) -> str | None:
    """sha256 of an image argument: PNG bytes of a PIL image, raw bytes of an array/tensor; lists in order."""
    if image is None:
        return None
    h = hashlib.sha256()
    for item in image if isinstance(image, list | tuple) else [image]:
        if isinstance(item, Image.Image):
            buf = io.BytesIO()
            item.save(buf, format="PNG")
            h.update(buf.getvalue())
        elif isinstance(item, torch.Tensor):
            h.update(item.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(np.ascontiguousarray(np.asarray(item)).tobytes())
    return h.hexdigest()


def provenance(pipe: object, call: Mapping[str, object] | None = None, source: str = "generate") -> dict:
    """The `runs` provenance columns for a pipeline and (optionally) the arguments of its call."""
    call = call or {}
    names, scales = lora_adapters(pipe)
    call_scale = (call.get("cross_attention_kwargs") or {}).get("scale")
    if call_scale is not None:  # a call-time LoRA scale multiplies every adapter's weight
        scales = [s * float(call_scale) for s in scales]
    strength = call.get("strength")
    return {
        "source": source,
        "pipeline_class": type(pipe).__name__,
        "scheduler_config": scheduler_config_json(pipe.scheduler),
        "lora_adapters": names,
        "lora_scales": scales,
        "controlnet": controlnet_classes(pipe),
        "strength": None if strength is None else float(strength),
        "init_image_sha256": image_sha256(call.get("image")) if strength is not None else None,
    }
