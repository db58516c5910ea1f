"""Training examples for the KeyframeFace LM: token ids with the loss on the answer only.

Supervised fine-tuning as in the release (MS-SWIFT, KeyframeFace §5.2): the request is written
with the tokenizer's chat template up to the assistant turn (``add_generation_prompt=True``), the
answer follows, then the end-of-turn token. Labels are ``-100`` on every request token, so only the
answer tokens and the closing end-of-turn token (which teaches the model to stop) carry loss.
Request and answer are tokenised separately -- exactly the token boundary the generator sees, which
continues from the same request ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
"""Label of positions without loss (PyTorch's cross-entropy default ``ignore_index``)."""


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn: ChatML's ``<|im_end|>`` if the vocabulary has it,
    otherwise the tokenizer's EOS."""
    tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
        return tid
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither <|im_end|> nor an EOS token to end the answer")
    return int(tokenizer.eos_token_id)


def prompt_ids(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """Token ids of the request up to and including the assistant header (the generation prompt)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """Token ids of an answer text, without special tokens (the generator forces the same pieces)."""
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"])


def encode_example(tokenizer: Any, messages: Sequence[dict], answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one request/answer pair; labels are -100 on the request."""
    prompt = prompt_ids(tokenizer, messages)
    target = answer_ids(tokenizer, answer) + [end_of_turn_id(tokenizer)]
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def collate(batch: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (input_ids, labels) to the longest: ``input_ids`` (B, T) padded with
    ``pad_id``, ``attention_mask`` (B, T) 1 on real tokens, ``labels`` (B, T) -100 on padding."""
    if not batch:
        raise ValueError("collate: empty batch")
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, (ids, lab) in enumerate(batch):
        if len(ids) != len(lab):
            raise ValueError(f"collate: example {b} has {len(ids)} ids but {len(lab)} labels")
        n = len(ids)
        input_ids[b, :n] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.as_tensor(list(lab), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
