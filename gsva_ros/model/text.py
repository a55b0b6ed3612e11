"""Command text → referring expressions, and the guard that keeps user text out of special tokens.

A robot operator types one command such as ``"the red mug, the spoon and the knife"``; GSVA
answers one slot per referring expression, so the command is split first.

Splitting rules (documented in the README and tested in ``test/model/test_text.py``):

1. If the command contains ``;`` or a newline, it is split on those characters only. This is
   the escape hatch for expressions that themselves contain ``,`` or ``and``
   (``"the black and white cat; the mug"``).
2. Otherwise it is split on commas and on the word ``and`` (also ``", and"``, ``&``).
3. Each expression is neutralised (special-token look-alikes are rewritten, see
   :func:`neutralise`), whitespace is collapsed, a trailing ``.``/``!``/``?`` is removed and
   the text is lower-cased, as GSVA's prompts are.
4. Pieces without any letter or digit (stray punctuation, a lone "and") are dropped. An
   empty result, more than ``max_expressions`` expressions, a command longer than
   ``max_command_chars`` or an expression longer than ``max_expression_chars`` raises
   :class:`CommandError` with a message meant for the user.
"""

from __future__ import annotations

import re
import unicodedata

DEFAULT_MAX_EXPRESSIONS = 5
DEFAULT_MAX_COMMAND_CHARS = 500
DEFAULT_MAX_EXPRESSION_CHARS = 120

# Every string the tokenizer treats as special, in any case, with optional inner spaces.
# "<image>", "<im_start>", "</s>" and friends are angle-bracket tokens, "[SEG]"/"[REJ]" square ones.
_FORGED = re.compile(r"[\[<]\s*/?\s*[a-z_]{1,20}\s*[\]>]", re.IGNORECASE)
_SPLIT_EXPLICIT = re.compile(r"[;\n\r]+")
_SPLIT_LIST = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+|\s*&\s*", re.IGNORECASE)
_TRAILING = re.compile(r"[\s.!?,;&]+$")
_LEADING = re.compile(r"^[\s,;&]+|^and\s+", re.IGNORECASE)


class CommandError(ValueError):
    """A command that cannot be turned into referring expressions (message is user-facing)."""


def neutralise(text: str) -> str:
    """Rewrite anything that looks like a special token so it is tokenized as plain words.

    ``"the [SEG] mug"`` → ``"the seg mug"``; ``"<image>"`` → ``"image"``. Control and
    format characters are removed, since they can hide a token from a human reader.
    """
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C" or ch in "\n\r\t")
    text = _FORGED.sub(lambda m: " " + re.sub(r"[\[\]<>/\s]", "", m.group(0)) + " ", text)
    # Stray brackets carry no meaning for a referring expression and could be re-joined.
    return text.replace("[", " ").replace("]", " ").replace("<", " ").replace(">", " ")


def normalise_expression(text: str) -> str:
    """Neutralise, collapse whitespace, strip trailing punctuation and lower-case."""
    text = " ".join(neutralise(text).split())
    # Strip separators until none is left, so normalising twice changes nothing (the prompt
    # re-normalises expressions; phrase and prompt must stay the same text).
    while True:
        stripped = _LEADING.sub("", _TRAILING.sub("", text))
        if stripped == text:
            break
        text = stripped
    text = text.lower()
    return "" if text == "and" else text


def split_command(
    command: str,
    max_expressions: int = DEFAULT_MAX_EXPRESSIONS,
    max_command_chars: int = DEFAULT_MAX_COMMAND_CHARS,
    max_expression_chars: int = DEFAULT_MAX_EXPRESSION_CHARS,
) -> list[str]:
    """Split a command into normalised referring expressions (see the module docstring)."""
    if not isinstance(command, str):
        raise CommandError(f"command must be text, got {type(command).__name__}")
    if len(command) > max_command_chars:
        raise CommandError(
            f"command is {len(command)} characters long; the limit is {max_command_chars}"
        )
    try:
        command.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CommandError("command is not valid UTF-8 text") from exc
    if not command.strip():
        raise CommandError("command is empty")
    splitter = _SPLIT_EXPLICIT if _SPLIT_EXPLICIT.search(command) else _SPLIT_LIST
    expressions = [normalise_expression(p) for p in splitter.split(command)]
    expressions = [e for e in expressions if any(ch.isalnum() for ch in e)]
    if not expressions:
        raise CommandError("command contains no referring expression")
    if len(expressions) > max_expressions:
        raise CommandError(
            f"command has {len(expressions)} expressions; the limit is {max_expressions}"
        )
    for e in expressions:
        if len(e) > max_expression_chars:
            raise CommandError(
                f"expression {e[:40]!r}… is {len(e)} characters; "
                f"the limit is {max_expression_chars}"
            )
    return expressions
