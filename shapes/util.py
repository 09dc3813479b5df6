"""Small helpers the trainer's pieces share (paths, log, atomic save, image tensors), kept apart so
that `vae`, `data`, `sample` and `train` import this module rather than each other."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent  # the repository: paths never depend on the working directory
DEFAULT_OUT = ROOT / "data" / "models" / "shapes"  # the exported pipeline StepX loads as model "shapes"
DEFAULT_WORK = ROOT / "data" / "models" / ".train"  # VAE, encoded data, checkpoints, log (not committed)


class Logger:
    """Appends timestamped lines to the log file and echoes them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str) -> None:
        """Write one line."""
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        print(line, flush=True)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename over the target, so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def to_tensor_images(batch: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC images -> float NCHW in [-1, 1], the VAE's input range."""
    arr = np.stack(batch).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Float NCHW in [-1, 1] (a VAE decode) -> uint8 NHWC numpy images."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def decoder_refinement(folder: Path) -> int | None:
    """Steps an exported VAE's decoder was refined for, from `vae_decoder_steps` in the front matter of the
    folder's README.md card; None when there is no card or it doesn't say. A value that isn't a count is an
    error (ValueError, one line): guessing would refine a refined decoder again, or skip an unrefined one."""
    try:
        text = (folder / "README.md").read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{folder / 'README.md'} can't be read ({type(err).__name__})") from None
    parts = text.split("\n---", 1) if text.startswith("---\n") else []
    for line in parts[0].splitlines()[1:] if len(parts) == 2 else []:
        key, sep, value = line.partition(":")
        if sep and key.strip() == "vae_decoder_steps":
            steps = value.strip().strip("\"'")
            if not steps.isdigit():
                raise ValueError(f"{folder / 'README.md'}: vae_decoder_steps is {value.strip()[:40]!r}, not a count")
            return int(steps)
    return None


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block on `n` torch threads, then restore the count the run was using."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
