"""Tokenizers: the project's own tiny one, and GSVA's special tokens for any base tokenizer.

GSVA adds ``[SEG]`` then ``[REJ]`` as ordinary added tokens and ``<im_start>``, ``<im_end>`` as
special tokens, in that order (``gsva_reference.md`` §3.3); ids are read back and checked
against the model config, never assumed.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerFast

from gsva_ros.model.config import GSVAConfig
from gsva_ros.model.prompt import IM_END, IM_START, REJ, SEG, SYSTEM, answer_text, question_text

BASE_SPECIALS = ["<unk>", "<s>", "</s>"]


def add_gsva_tokens(tokenizer) -> None:
    """Add GSVA's tokens in the official order (already present ones are kept)."""
    tokenizer.add_tokens([SEG])
    tokenizer.add_tokens([REJ])
    tokenizer.add_tokens([IM_START, IM_END], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token


def token_ids(tokenizer) -> dict[str, int]:
    """The ids GSVA depends on, read from the tokenizer."""
    ids = {
        "bos_token_id": tokenizer.convert_tokens_to_ids("<s>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("</s>"),
        "pad_token_id": tokenizer.pad_token_id,
        "im_start_token_id": tokenizer.convert_tokens_to_ids(IM_START),
        "im_end_token_id": tokenizer.convert_tokens_to_ids(IM_END),
        "seg_token_id": tokenizer.convert_tokens_to_ids(SEG),
        "rej_token_id": tokenizer.convert_tokens_to_ids(REJ),
    }
    unk = tokenizer.unk_token_id
    missing = [k for k, v in ids.items() if v is None or (v == unk and k != "pad_token_id")]
    if missing:
        raise ValueError(f"tokenizer lacks GSVA tokens: {', '.join(missing)}")
    return ids


def check_tokenizer(tokenizer, config: GSVAConfig) -> None:
    """Fail loudly when the tokenizer's ids or size disagree with the model config."""
    ids = token_ids(tokenizer)
    wrong = {k: (v, getattr(config, k)) for k, v in ids.items() if getattr(config, k) != v}
    if wrong:
        detail = ", ".join(f"{k}: tokenizer {a} vs config {b}" for k, (a, b) in wrong.items())
        raise ValueError(f"tokenizer and model config disagree ({detail})")
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model embeds only {config.vocab_size}"
        )


def build_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (any text is representable) on template + scene text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 4,  # room for the four GSVA tokens
        special_tokens=BASE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    base = [SYSTEM + " USER: ", question_text(["x"]) + " ASSISTANT: " + answer_text(["x"])]
    tok.train_from_iterator(list(base) * 50 + list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    add_gsva_tokens(fast)
    return fast
