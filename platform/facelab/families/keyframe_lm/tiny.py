"""A tiny Qwen3-architecture causal LM with random weights, built offline: the embedded stand-in for
Qwen3-4B / Qwen3-14B (KeyframeFace §5.2) on machines without a model hub. It is NOT a pretrained
language model: it knows nothing until fine-tuned, so its numbers say whether the pipeline works,
not what the paper's model would score.

What :func:`build_tiny_lm` writes to ``out_dir`` (loads with ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained(out_dir)``):

``model.safetensors``, ``config.json``, ``generation_config.json``
    ``Qwen3ForCausalLM(Qwen3Config(...))`` initialised under ``torch.manual_seed(seed)``, tied input
    and output embeddings (as the small Qwen3 models); ``config.json`` carries ``facelab_label``.
``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``
    A byte-level BPE trained with HF ``tokenizers`` on ``texts`` plus a fixed corpus (the 61 channel
    names, JSON punctuation, every answer number from -1.0 to 1.0 in the answer spelling, the ChatML
    role names). The pre-tokenizer keeps a signed decimal number (``-0.25``) in one piece, splits
    letters from punctuation and whitespace (GPT-2 style), and never glues a minus sign to the
    punctuation before it -- so every answer number becomes one or two tokens, and an answer's
    tokenisation is the concatenation of its skeleton's and its values' tokenisations (the property
    the constrained decoder relies on to be identical to plain greedy decoding). Specials are ChatML's
    ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (end of turn / EOS); the chat template
    is plain ChatML, as Qwen's without tools and thinking.
``README.md``
    What this is, how it was built, and the label.

Byte-stable: equal inputs give equal files (BPE training in ``tokenizers`` is deterministic, the
weights come from a seeded CPU generator, safetensors has no timestamps), so DVC can pin the output.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

LABEL = "tiny random-init Qwen3-architecture model built offline — not a pretrained LM"
"""Written to ``config.json`` as ``facelab_label``; serving and reports show it."""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML, as Qwen's template for plain system/user/assistant turns."""

PRETOKENIZE_PATTERN = (
    r"-?\d+(?:\.\d+)?"  # a signed decimal number stays one piece
    r"|'s|'t|'re|'ve|'m|'ll|'d"
    r"| ?\p{L}+"
    r"| ?(?:-(?!\d)|[^\s\p{L}\p{N}\-])+"  # punctuation runs, but a minus before a digit starts a number
    r"|\s+(?!\S)|\s+"
)

_NUMBER_REPEATS = 8  # the number list is repeated so that BPE merges every answer number


def _fixed_corpus() -> list[str]:
    from facelab.data.arkit import CHANNELS
    from facelab.families.keyframe_lm.prompts import format_value

    numbers = " ".join(format_value(i / 100) for i in range(-100, 101))
    answer_like = ",".join(f'"{name}":0.0' for name in CHANNELS)
    return [
        " ".join(CHANNELS),
        answer_like,
        "[0.0, 0.0]",
        '{"Keyframe_one":{}}',
        "system user assistant",
        '{ } [ ] : , " - .',
        *([numbers] * _NUMBER_REPEATS),
    ]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, pattern: str = PRETOKENIZE_PATTERN):
    """A byte-level BPE trained offline on ``texts``, pre-split by ``pattern``, with the chat specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter(texts), trainer)
    return tok


def _readme(summary: dict) -> str:
    return f"""# Tiny Qwen3-architecture LM (facelab)

**{LABEL}.**

This directory was written by `facelab.families.keyframe_lm.tiny.build_tiny_lm` (the `tiny_lm` DVC
stage). It stands in for Qwen3-4B / Qwen3-14B (KeyframeFace §5.2) where no model hub is reachable.
Its weights are random (seed {summary["seed"]}); fine-tuning it exercises the whole pipeline, but its
scores say nothing about a pretrained LLM.

- architecture: `Qwen3ForCausalLM`, {summary["num_layers"]} layers, hidden {summary["hidden_size"]},
  {summary["num_heads"]} query / {summary["num_kv_heads"]} key-value heads of {summary["head_dim"]},
  MLP {summary["intermediate_size"]}, tied embeddings, {summary["n_params"]:,} parameters
- tokenizer: byte-level BPE trained offline with HF `tokenizers` on the corpus plus channel names,
  JSON punctuation and the numbers -1.0 .. 1.0; {summary["vocab_size"]} tokens; ChatML specials
  `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (end of turn) and a ChatML chat template

Load with `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`.
"""


def is_tiny_lm_dir(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir`` holds a model :func:`build_tiny_lm` wrote (``config.json`` with its label)."""
    from facelab.data.emoava import json_object_or_none

    config = json_object_or_none(Path(model_dir) / "config.json")
    return config is not None and config.get("facelab_label") == LABEL


def claim_output(out_dir: str | os.PathLike, force: bool = False) -> None:
    """Refuse ``out_dir`` unless it is absent, empty or a tiny model written here, or ``force``: the
    build replaces the whole directory, and ``--out models`` must not wipe every model beside it."""
    from facelab.data.emoava import claim_output_dir

    claim_output_dir(
        Path(out_dir),
        owned=is_tiny_lm_dir,
        what="the tiny LM",
        marker="config.json with facelab_label of the tiny LM",
        force=force,
    )


def build_tiny_lm(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    *,
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 192,
    seed: int = 0,
    max_position_embeddings: int = 4096,
    embedding_std: float = 0.5,
    force: bool = False,
) -> dict:
    """Train the tokenizer on ``texts`` (+ the fixed corpus), build the random-init model, save both
    to ``out_dir`` (replaced atomically). Returns a summary (sizes and the files' SHA-256).

    An existing ``out_dir`` is replaced only when it is empty or a model this function wrote (its
    ``config.json`` carries :data:`LABEL`: e.g. the DVC stage's previous output), or with ``force``;
    any other directory is refused before any work (:func:`claim_output`).

    ``embedding_std``: the (tied) token embeddings are drawn from N(0, embedding_std²) instead of
    Qwen3's N(0, 0.02²). The embeddings and the output layer are frozen under LoRA, and with tied
    0.02-scale embeddings the logits of a random model stay within about ±1, so no adapter could make
    a confident prediction (measured: the answer loss stalls near 6.0 nats at vocab 1,024, against
    2.3 after 100 steps at 0.5). A pretrained LM has no such limit; this only makes the stand-in
    learnable."""
    problems = [
        f"{name} must be a positive integer, got {value!r}"
        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("intermediate_size", intermediate_size),
            ("max_position_embeddings", max_position_embeddings),
        )
        if isinstance(value, bool) or not isinstance(value, int) or value < 1
    ]
    if not problems and num_heads % num_kv_heads:
        problems.append(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if not problems and vocab_size < 256 + len(SPECIAL_TOKENS):
        problems.append(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials)")
    if problems:
        raise ValueError("build_tiny_lm: " + "; ".join(problems))
    out = Path(out_dir)
    claim_output(out, force)  # before the heavy imports and the work: a wrong --out fails at once

    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    corpus = [t for t in texts if isinstance(t, str)] + _fixed_corpus()
    tok = train_bpe_tokenizer(corpus, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_position_embeddings,
    )
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = Qwen3Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    config.facelab_label = LABEL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).eval()
        with torch.no_grad():  # tied: the output layer shares this matrix
            model.get_input_embeddings().weight.normal_(0.0, embedding_std)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    n_params = sum(p.numel() for p in model.parameters())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        summary = {
            "label": LABEL,
            "vocab_size": config.vocab_size,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "intermediate_size": intermediate_size,
            "seed": seed,
            "n_params": n_params,
            "max_position_embeddings": max_position_embeddings,
            "embedding_std": embedding_std,
        }
        (tmp / "README.md").write_text(_readme(summary), encoding="utf-8")
        summary["files"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp.iterdir())}
        if out.exists():
            shutil.rmtree(out)
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def tiny_lm_corpus(data_dir: Path):
    """Texts the tiny model's tokenizer is trained on: every training request and answer, in both
    prompt formats and all annotation types (so numbers, channel names and JSON tokenise compactly)."""
    from facelab.data.keyframeface import ANNOTATIONS, load_split
    from facelab.families.keyframe_lm.prompts import PromptConfig, answer_text, build_messages

    for s in load_split(data_dir, "train"):
        for kf in s.keyframes:
            for fmt in ("semantic", "non_semantic"):
                for ann in ANNOTATIONS:
                    cfg = PromptConfig(format=fmt, annotation=ann, glossary=True, target_frame_instruction=True)
                    for m in build_messages(s, kf.index, cfg):
                        yield m["content"]
                yield answer_text(kf.values, kf.index, cfg)


def add_cli(data_subparsers) -> None:
    """``facelab data build-tiny-lm`` (the DVC stage ``tiny_lm``): this family's :attr:`Family.add_cli`."""
    bt = data_subparsers.add_parser(
        "build-tiny-lm", help="build the tiny random-init Qwen3-architecture model + offline tokenizer"
    )
    bt.add_argument("--params", default="params.yaml")
    bt.add_argument("--data", default="data/keyframeface", help="corpus the tokenizer is trained on")
    bt.add_argument("--out", default="models/tiny-qwen3")
    bt.add_argument(
        "--force", action="store_true", help="replace --out even if it is not empty and not a model this command wrote"
    )
    bt.set_defaults(
        data_fn=lambda args, params: build_tiny_lm(
            Path(args.out), tiny_lm_corpus(Path(args.data)), **params("tiny_lm"), force=args.force
        )
    )
