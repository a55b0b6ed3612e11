"""Property-based tests (hypothesis): command splitter, answer skeleton ↔ slot parsing, and the
guarantee that user text never becomes a special token.

The engine answers by slot tokens: :func:`encode_conversation` builds the answer skeleton with
``[SEG]`` in every slot, slot decoding substitutes ``[SEG]``/``[REJ]`` per slot, and free
generation is parsed back by scanning for the two slot token ids. These properties hold for
any text an operator (or an attacker) can type. Message ↔ numpy conversion properties live in
``test/ros/test_conversions.py``.
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gsva_ros.model.config import IMAGE_TOKEN_INDEX
from gsva_ros.model.prompt import (
    EOS,
    IMAGE,
    answer_text,
    encode_conversation,
    miscopied_slots,
    prompt_text,
)
from gsva_ros.model.text import (
    DEFAULT_MAX_EXPRESSION_CHARS,
    DEFAULT_MAX_EXPRESSIONS,
    CommandError,
    normalise_expression,
    split_command,
)

SPECIAL_TEXT = ["[SEG]", "[REJ]", "<image>", "<im_start>", "<im_end>", "</s>", "<s>", "<unk>",
                "[seg]", "< /s >", "[ REJ ]", "<IMAGE>", "[\u200bSEG]", "<im_\u200dstart>"]
# Pieces an operator, a speech recogniser or an attacker produce; glued without separators
# they also form things like "mug[SEG]and", "<<image>>" or "[[REJ]]".
PIECES = st.sampled_from([
    "the", "red", "mug", "spoon", "left", "Knife", "ANDROID", "brandy", "x1", "and", "And",
    " and ", "&", ",", ", and ", ";", "\n", "\r\n", ".", "!", "?", ":", " ", "  ", "\t",
    "\u00a0", "\u3000", "\u200b", "\u202e", "\x1b[31m", "\x00", "[", "]", "<", ">", "/", "_",
    "\U0001f37a", "\U0001f44d\U0001f3fd", "\u05db\u05d5\u05e1", "\u0627\u0644\u0643\u0648\u0628",
    "\u00fcber", "\u0130", "\u1e9e", "\ufb01", *SPECIAL_TEXT,
])
COMMANDS = st.lists(st.one_of(PIECES, st.text(max_size=6)), max_size=24).map("".join)
WORDS = st.sampled_from(["the", "red", "mug", "left", "blue", "cup", "android", "brandy",
                         "x1", "\u00fcber", "\u043a\u0440\u0443\u0436\u043a\u0430",
                         "\u05db\u05d5\u05e1", "Mug", "SPOON"])
EXPRESSIONS = st.lists(WORDS, min_size=1, max_size=4).map(" ".join)
LIST_SEPARATORS = st.sampled_from([", ", " and ", ", and ", " & ", " ,  ", "&"])
EXPLICIT_SEPARATORS = st.sampled_from(["; ", ";", "\n", " ;\n "])
FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _is_clean(expression: str) -> bool:
    return (
        expression == expression.strip()
        and "  " not in expression
        and not set(expression) & set("[]<>;\n\r")
        and not any(unicodedata.category(ch)[0] == "C" for ch in expression)
        and any(ch.isalnum() for ch in expression)
        and expression == expression.lower()
        and len(expression) <= DEFAULT_MAX_EXPRESSION_CHARS
    )


# ============================================================================ the splitter
@FAST
@given(command=COMMANDS)
def test_split_command_gives_clean_expressions_or_a_command_error(command):
    try:
        expressions = split_command(command)
    except CommandError as exc:
        assert str(exc)  # a message for the user, never an empty error
        return
    assert 1 <= len(expressions) <= DEFAULT_MAX_EXPRESSIONS
    for e in expressions:
        assert _is_clean(e), e
        assert not any(s.lower() in e for s in SPECIAL_TEXT if s.isascii() and " " not in s)


@FAST
@given(expressions=st.lists(EXPRESSIONS, min_size=1, max_size=DEFAULT_MAX_EXPRESSIONS),
       data=st.data())
def test_a_plain_list_is_split_back_into_its_expressions(expressions, data):
    """"a, b and c", "a; b" …: what the operator listed is what the model is asked about.
    The word "and" inside a word (android, brandy) is never a separator."""
    if data.draw(st.booleans()):
        seps = [data.draw(LIST_SEPARATORS) for _ in expressions[1:]]
    else:
        seps = [data.draw(EXPLICIT_SEPARATORS) for _ in expressions[1:]]
    command = expressions[0] + "".join(s + e for s, e in zip(seps, expressions[1:], strict=True))
    assert split_command(command) == [e.lower() for e in expressions]


@FAST
@given(command=COMMANDS)
def test_limits_are_errors_never_truncation(command):
    """A command over a limit is refused as a whole; nothing is silently dropped."""
    try:
        full = split_command(command, max_expressions=32, max_command_chars=10_000)
    except CommandError:
        return
    if len(full) > 2:
        with pytest.raises(CommandError, match="limit is 2"):
            split_command(command, max_expressions=2, max_command_chars=10_000)
    else:
        assert split_command(command, max_expressions=2, max_command_chars=10_000) == full


@FAST
@example(command="and and mug; the spoon")
@given(command=COMMANDS)
def test_normalisation_is_idempotent_so_phrases_match_the_prompt(command):
    try:
        expressions = split_command(command)
    except CommandError:
        return
    assert [normalise_expression(e) for e in expressions] == expressions
    assert split_command("; ".join(expressions) + ";") == expressions


# ============================================================================ answers ↔ slots
@pytest.fixture(scope="module")
def ids(tiny_config):
    c = tiny_config
    return {"seg": c.seg_token_id, "rej": c.rej_token_id, "im_start": c.im_start_token_id,
            "im_end": c.im_end_token_id, "bos": c.bos_token_id, "eos": c.eos_token_id,
            "unk": c.pad_token_id}


def _expressions(data) -> list[str]:
    """Expressions as the engine gets them: split_command output that is already a fixed point
    of normalisation."""
    command = data.draw(COMMANDS)
    try:
        expressions = split_command(command)
    except CommandError:
        expressions = data.draw(st.lists(EXPRESSIONS, min_size=1, max_size=5)).copy()
        expressions = [e.lower() for e in expressions]
    return [e for e in expressions if normalise_expression(e) == e] or ["the mug"]


@FAST
@given(data=st.data())
def test_answer_skeleton_and_slot_parsing_round_trip(tiny_tokenizer, tiny_config, ids, data):
    expressions = _expressions(data)
    n = len(expressions)
    present = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    conv = encode_conversation(tiny_tokenizer, tiny_config, expressions, present)
    skeleton = encode_conversation(tiny_tokenizer, tiny_config, expressions)
    prompt = encode_conversation(tiny_tokenizer, tiny_config, expressions, with_answer=False)
    frame = encode_conversation(tiny_tokenizer, tiny_config, ["x"], with_answer=False)

    # One slot per expression, in order, holding the decision.
    assert len(conv.slot_positions) == n
    assert [conv.ids[p] == ids["seg"] for p in conv.slot_positions] == present
    # Slot decoding's assumption: the skeleton equals every answer except at the slots.
    assert skeleton.slot_positions == conv.slot_positions
    assert len(skeleton.ids) == len(conv.ids)
    assert all(skeleton.ids[p] == ids["seg"] for p in skeleton.slot_positions)
    slots = set(conv.slot_positions)
    assert [t for i, t in enumerate(conv.ids) if i not in slots] == [
        t for i, t in enumerate(skeleton.ids) if i not in slots]
    # Generation starts from the prompt; the frame prefix (cached per frame) is command-free.
    assert prompt.ids == conv.ids[: conv.prompt_len]
    assert conv.ids[: conv.prefix_len] == frame.ids[: frame.prefix_len]
    # The generated-answer parser (slot token ids in order) gives the decisions back.
    answer_ids = conv.ids[conv.prompt_len:]
    assert [t == ids["seg"] for t in answer_ids if t in (ids["seg"], ids["rej"])] == present
    # And the answer decodes to exactly the answer text (what the node publishes).
    decoded = tiny_tokenizer.decode(answer_ids, skip_special_tokens=False)
    assert decoded == " " + answer_text(expressions, present) + EOS
    # A faithful answer never trips generate's phrase check, whatever the expressions are.
    assert miscopied_slots(decoded, expressions) == []
    text = answer_text(expressions, present)
    assert text.count("[SEG]") == sum(present) and text.count("[REJ]") == n - sum(present)


@FAST
@given(command=COMMANDS, forged=st.lists(st.sampled_from(SPECIAL_TEXT), min_size=1, max_size=6))
def test_user_text_never_becomes_a_special_token(tiny_tokenizer, tiny_config, ids, command,
                                                 forged):
    """Whatever is typed, the conversation holds exactly the template's special tokens."""
    text = command + "".join(f" {f}{command[:3]}" for f in forged)
    expression = normalise_expression(text)
    raw = tiny_tokenizer(expression, add_special_tokens=False)["input_ids"]
    assert not set(raw) & set(ids.values())
    expressions = [e for e in (expression, "the mug") if any(ch.isalnum() for ch in e)]
    conv = encode_conversation(tiny_tokenizer, tiny_config, expressions)
    counts = {k: conv.ids.count(v) for k, v in ids.items() if k not in ("seg", "rej")}
    assert counts == {"im_start": 1, "im_end": 1, "bos": 1, "eos": 1, "unk": 0}
    assert len(conv.slot_positions) == len(expressions)
    assert conv.ids.count(IMAGE_TOKEN_INDEX) == tiny_config.num_image_tokens
    assert prompt_text(expressions).count(IMAGE) == 1
