"""Pieces both generation paths share (UNet: pipeline.generate; SD3/Flux: pipeline.generate_dit): the prompt's
CLIP tokens, run ids, decoded tensors as images. Kept apart so neither path imports the other.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict
from datetime import UTC, datetime

import diffusers
import torch
from PIL import Image

from pipeline.trace import TokenInfo, run_row
from schema.version import stepx_version

PREVIEW_MAX_PX = 256  # long side of stored step previews


def prompt_tokens(tokenizer: object, prompt: str) -> tuple[list[TokenInfo], bool]:
    """Tokens of a prompt (start, pieces, first end token) and whether it was truncated.

    CLIP's BPE marks a word's last piece with '</w>'; pieces up to it form one word.
    """
    full = tokenizer(prompt, truncation=False).input_ids
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    truncated = len(full) > len(ids)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = [i for i in ids if i not in (bos, eos)]
    pieces = tokenizer.convert_ids_to_tokens(body)
    tokens = [TokenInfo(0, bos, "<start>", None, None, "start", False)]
    word_index, current = 0, []
    for pos, (tid, piece) in enumerate(zip(body, pieces, strict=True), start=1):
        current.append(pos - 1)
        tokens.append(TokenInfo(pos, tid, "", word_index, None, "word", True))
        if piece.endswith("</w>") or pos == len(body):
            word = _decode(tokenizer, [body[i] for i in current])
            for i in current:
                tokens[i + 1].word = word
            word_index += 1
            current = []
    for t, (tid, piece) in zip(tokens[1:], zip(body, pieces, strict=True), strict=True):
        t.token_text = _decode(tokenizer, [tid]) or piece
    tokens.append(TokenInfo(len(body) + 1, eos, "<end>", None, None, "end", True))
    return tokens, truncated


def _decode(tokenizer: object, ids: list[int]) -> str:
    """Readable text of token ids (byte-level pieces decoded, word-end markers dropped)."""
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False).strip()


def new_run_id(now: datetime | None = None) -> str:
    """Sortable run id: UTC time plus 6 random hex digits."""
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def to_pil(images: torch.Tensor, max_px: int | None = None) -> list[Image.Image]:
    arr = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    out = []
    for a in arr.permute(0, 2, 3, 1).cpu().numpy():
        img = Image.fromarray(a)
        if max_px and max(img.size) > max_px:
            scale = max_px / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        out.append(img)
    return out


def provenance_fields(model: object, cfg: object) -> dict:
    """The run-row fields that say which model, libraries and config made a run (UNet and DiT runs alike)."""
    return {
        "model_name": model.spec.name,
        "model_id": model.model_id,
        "model_fingerprint": model.fingerprint,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "stepx_version": stepx_version(),
        "device": model.device,
        "dtype": model.dtype,
        "tags": list(cfg.tags),
        "gallery": cfg.gallery,
        "config_json": json.dumps({**asdict(cfg), "model": model.spec.name, "model_id": model.model_id}),
    }


def generated_run_row(model: object, cfg: object, pipe: object, steps: int, **columns: object) -> dict:
    """The `runs` row of a run `stepx` generated from `cfg` (UNet and DiT alike): a new id, the config's prompt,
    seed, guidance and size, the scheduler, `provenance_fields`, then the capture's own `columns`."""
    created = datetime.now(UTC)
    return run_row(
        run_id=new_run_id(created),
        created_at=created,
        prompt=cfg.prompt,
        negative_prompt=cfg.negative_prompt,
        seed=cfg.seed,
        steps=steps,
        guidance=cfg.guidance,
        scheduler=type(pipe.scheduler).__name__,
        size=(cfg.height, cfg.width),
        **provenance_fields(model, cfg),
        **columns,
    )
