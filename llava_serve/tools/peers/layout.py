"""The bench checkpoint in the classic LLaVA-HF weight layout, for the peers' converters.

transformers 5.2x saves a LLaVA's CLIP tower as `vision_tower.encoder...`; older transformers
(the 5.5 that optimum-intel 2.2 pins) and llama.cpp's CLIP converter read
`vision_tower.vision_model.encoder...`, and the older loader silently re-initialises weights it
does not find. This copy renames those keys only; config and tokenizer files are linked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TOWER = "vision_tower."
CLASSIC = "vision_tower.vision_model."


def classic_name(key: str) -> str:
    if key.startswith(TOWER) and not key.startswith(CLASSIC):
        return CLASSIC + key[len(TOWER) :]
    return key


def classic_copy(model: Path, dest: Path) -> Path:
    """`dest` holding the checkpoint with classic vision keys (made once)."""
    from safetensors.torch import load_file, save_file

    done = dest / ".complete"
    if done.is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for src in model.iterdir():
        target = dest / src.name
        if src.suffix == ".safetensors":
            weights = load_file(src)
            save_file({classic_name(k): v.contiguous() for k, v in weights.items()}, str(target), {"format": "pt"})
        elif src.name.endswith(".safetensors.index.json"):
            index = json.loads(src.read_text())
            index["weight_map"] = {classic_name(k): v for k, v in index["weight_map"].items()}
            target.write_text(json.dumps(index, indent=2))
        elif src.is_file() and not target.exists():
            os.symlink(src.resolve(), target)
    done.write_text(str(model))
    return dest
