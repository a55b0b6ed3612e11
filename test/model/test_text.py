"""Command splitter and special-token neutralising."""

import pytest

from gsva_ros.model.text import CommandError, neutralise, normalise_expression, split_command


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("the red mug, the spoon and the knife", ["the red mug", "the spoon", "the knife"]),
        ("the red mug, the spoon, and the knife.", ["the red mug", "the spoon", "the knife"]),
        ("The Red Mug", ["the red mug"]),
        ("mug & spoon", ["mug", "spoon"]),
        ("the black and white cat; the mug", ["the black and white cat", "the mug"]),
        ("a, b\nc and d", ["a, b", "c and d"]),
        ("  the   leftmost    star  ", ["the leftmost star"]),
        ("android, brandy", ["android", "brandy"]),  # 'and' inside words is not a separator
    ],
)
def test_split_command(command, expected):
    assert split_command(command) == expected


@pytest.mark.parametrize("command", ["", "   ", " , ; ", "\n\n", ". , and"])
def test_empty_commands_are_refused(command):
    with pytest.raises(CommandError):
        split_command(command)


def test_limits_have_clear_messages():
    with pytest.raises(CommandError, match="limit is 3"):
        split_command("a, b, c, d", max_expressions=3)
    with pytest.raises(CommandError, match="characters long"):
        split_command("x" * 600, max_command_chars=500)
    with pytest.raises(CommandError, match="characters; the limit"):
        split_command("y" * 50, max_expression_chars=20)
    with pytest.raises(CommandError, match="UTF-8"):
        split_command("mug \ud800")
    with pytest.raises(CommandError, match="text"):
        split_command(b"mug")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "forged",
    [
        "[SEG]",
        "[rej]",
        "<image>",
        "<im_start>",
        "<im_end>",
        "</s>",
        "<s>",
        "<unk>",
        "[ SEG ]",
        "< /s >",
    ],
)
def test_forged_special_tokens_are_neutralised(forged):
    out = normalise_expression(f"the {forged} mug")
    assert not any(c in out for c in "[]<>")
    assert out.startswith("the ") and out.endswith(" mug")


def test_neutralise_removes_hidden_format_characters():
    assert neutralise("mu\u200bg\u202e") == "mug"
