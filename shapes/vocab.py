"""Convert CLIP's BPE merge list into the vocab.json + merges.txt a `CLIPTokenizer` loads.

    python -m shapes.vocab path/to/bpe_simple_vocab_16e6.txt.gz data/tokenizers/clip

The MIT-licensed `bpe_simple_vocab_16e6.txt.gz` ships inside the `open_clip_torch` wheel on PyPI
(`pip download --no-deps open_clip_torch==3.3.0`; don't install it, it needs torchvision). The token
ids this produces are CLIP's own, so prompts split exactly as in Stable Diffusion 1.5.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file.


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins CLIP's BPE uses for raw bytes, in CLIP's vocabulary order.

    Printable bytes stand for themselves and come first; the other bytes follow, mapped to 256+n.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def convert(bpe_gz: Path, out_dir: Path) -> tuple[int, int]:
    """Write vocab.json and merges.txt; return (vocab size, merge count)."""
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    alphabet = byte_alphabet()
    vocab = alphabet + [ch + "</w>" for ch in alphabet] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    merge_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (out_dir / "merges.txt").write_text(merge_text, encoding="utf-8")
    return len(vocab), len(merges)


if __name__ == "__main__":
    size, n = convert(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"vocab {size} tokens, {n} merges -> {sys.argv[2]}")
