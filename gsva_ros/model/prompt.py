"""GSVA's conversation (llava_v1 template) and its token ids (``gsva_reference.md`` §1.2).

Full training string for expressions e1 (present) and e2 (absent)::

    <system> USER: <im_start><image><im_end>
    What are e1, e2 in this image? Please output segmentation masks. ASSISTANT: Sure, they
    are e1:[SEG], e2:[REJ].</s>        (one line in reality)

Tokenization follows LLaVA's ``tokenizer_image_token``: the string is split on ``<image>``,
each chunk is tokenized on its own (BOS only at the very start) and the image is one
``IMAGE_TOKEN_INDEX`` sentinel, which we expand in place to the 256 CLIP positions so that
token positions equal sequence positions.

Slot decoding needs the answer's ids before the ``[SEG]``/``[REJ]`` choices are known: both are
added tokens that split the text the same way, so the skeleton is tokenized once with ``[SEG]``
in every slot and the decoder substitutes its choice per slot (:class:`EncodedConversation`).
User text reaches this module only through :func:`gsva_ros.model.text.normalise_expression`,
and :func:`encode_conversation` re-checks that no special token came from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gsva_ros.model.config import IMAGE_TOKEN_INDEX, GSVAConfig
from gsva_ros.model.text import normalise_expression

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SEG, REJ = "[SEG]", "[REJ]"
IMAGE, IM_START, IM_END, EOS = "<image>", "<im_start>", "<im_end>", "</s>"
QUESTION = "What are {} in this image? Please output segmentation masks."
ANSWER_START = "Sure, they are "


def question_text(expressions: list[str]) -> str:
    return QUESTION.format(", ".join(expressions))


def answer_text(expressions: list[str], present: list[bool] | None = None) -> str:
    """``Sure, they are e1:[SEG], e2:[REJ].`` — ``present=None`` puts ``[SEG]`` in every slot."""
    present = [True] * len(expressions) if present is None else present
    slots = [f"{e}:{SEG if p else REJ}" for e, p in zip(expressions, present, strict=True)]
    return ANSWER_START + ", ".join(slots) + "."


def prompt_text(expressions: list[str]) -> str:
    """Everything up to and including ``ASSISTANT:`` (what generation starts from)."""
    user = f"{IM_START}{IMAGE}{IM_END}\n{question_text(expressions)}"
    return f"{SYSTEM} USER: {user} ASSISTANT:"


_SLOT_TOKEN = re.compile("|".join(re.escape(t) for t in (SEG, REJ)))
_NON_WORD = re.compile(r"[\W_]+")


def _words(text: str) -> str:
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def slot_texts(answer: str) -> list[str]:
    """The text written before each ``[SEG]``/``[REJ]`` of a generated answer, one per slot
    (for the first slot, from the start of the answer)."""
    return _SLOT_TOKEN.split(answer)[:-1]


def miscopied_slots(answer: str, expressions: list[str]) -> list[tuple[int, str]]:
    """Slots of a generated ``answer`` whose own text does not name their expression.

    GSVA's mask prompt is the state just before ``[SEG]``, so a slot written as "the blue
    square:[SEG]" when "the red circle" was asked segments the blue square and reports it as
    the red circle. Slot ``i`` passes when the words of ``expressions[i]`` appear, in order and
    contiguous, in the text between slot ``i - 1`` and slot ``i`` (case and punctuation
    ignored), which accepts every answer style GSVA was trained on ("e:[SEG]", "the mask of e
    is [SEG]", …). Returns ``(slot index, written text)`` for each failing slot; slots beyond
    the shorter of the two lists are not checked (the caller compares the counts).
    """
    bad = []
    for i, (text, expr) in enumerate(zip(slot_texts(answer), expressions, strict=False)):
        if f" {_words(expr)} " not in f" {_words(text)} ":
            written = text.strip(" ,:")
            if written.startswith(ANSWER_START):  # the slot's own words are what matters
                written = written[len(ANSWER_START):]
            bad.append((i, written))
    return bad


@dataclass
class EncodedConversation:
    """Token ids of one conversation, image expanded to ``num_image_tokens`` sentinels.

    ``ids``: prompt + answer (+ EOS when ``answer`` was given); ``prompt_len``: number of ids
    up to ``ASSISTANT:``; ``prefix_len``: ids up to and including ``<im_end>`` (identical for
    every command on a frame, hence cacheable); ``slot_positions``: index in ``ids`` of each
    ``[SEG]``/``[REJ]`` slot, in expression order.
    """

    ids: list[int]
    prompt_len: int
    prefix_len: int
    slot_positions: list[int]


def _encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_conversation(
    tokenizer,
    config: GSVAConfig,
    expressions: list[str],
    present: list[bool] | None = None,
    with_answer: bool = True,
) -> EncodedConversation:
    """Tokenize one conversation. ``expressions`` are normalised again here (idempotent).

    ``present=None`` with ``with_answer=True`` gives the slot-decoding skeleton ([SEG] in
    every slot). Raises ValueError if any special token count differs from what the template
    put there, i.e. if user text managed to produce one.
    """
    expressions = [normalise_expression(e) for e in expressions]
    text = prompt_text(expressions)
    if with_answer:
        text += " " + answer_text(expressions, present) + EOS
    before, after = text.split(IMAGE)
    ids = [config.bos_token_id] + _encode_text(tokenizer, before)
    ids += [IMAGE_TOKEN_INDEX] * config.num_image_tokens
    prefix_end = len(ids) + 1  # the <im_end> that follows the image
    ids += _encode_text(tokenizer, after)
    if ids[prefix_end - 1] != config.im_end_token_id:
        raise ValueError("tokenizer did not produce <im_end> right after the image")

    prompt_ids_after = _encode_text(tokenizer, prompt_text(expressions).split(IMAGE)[1])
    prompt_len = prefix_end - 1 + len(prompt_ids_after)
    if ids[:prompt_len] != ids[: prefix_end - 1] + prompt_ids_after:
        raise ValueError("answer tokenization changed the prompt tokens")

    slot_ids = (config.seg_token_id, config.rej_token_id)
    slots = [i for i, t in enumerate(ids) if t in slot_ids]
    n_slots = len(expressions) if with_answer else 0
    specials = {
        config.im_start_token_id: 1,
        config.im_end_token_id: 1,
        config.eos_token_id: 1 if with_answer else 0,
        config.bos_token_id: 1,
    }
    counts_ok = len(slots) == n_slots and all(
        sum(t == tid for t in ids) == n for tid, n in specials.items()
    )
    if not counts_ok:
        raise ValueError("special tokens in the encoded conversation do not match the template")
    return EncodedConversation(
        ids=ids, prompt_len=prompt_len, prefix_len=prefix_end, slot_positions=slots
    )
