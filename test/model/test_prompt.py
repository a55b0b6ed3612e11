"""Prompt string, token ids and special-token safety (gsva_reference.md §1.2, §3.3)."""

import pytest

from gsva_ros.model.config import IMAGE_TOKEN_INDEX, gsva_7b, gsva_13b
from gsva_ros.model.prompt import (
    SYSTEM,
    answer_text,
    encode_conversation,
    miscopied_slots,
    prompt_text,
    slot_texts,
)


def test_prompt_and_answer_strings():
    assert prompt_text(["e1", "e2"]) == (
        SYSTEM + " USER: <im_start><image><im_end>\n"
        "What are e1, e2 in this image? Please output segmentation masks. ASSISTANT:"
    )
    assert answer_text(["e1", "e2"], [True, False]) == "Sure, they are e1:[SEG], e2:[REJ]."


def test_slot_texts_split_a_generated_answer_at_its_slot_tokens():
    assert slot_texts("Sure, they are e1:[SEG], e2:[REJ].") == ["Sure, they are e1:", ", e2:"]
    assert slot_texts("Sure, no slot.") == []


@pytest.mark.parametrize("answer", [
    # the five answer styles GSVA trains with (gsva_reference.md §1.2), any case and spacing
    "Sure, they are the red mug:[SEG], the Spoon:[REJ].",
    "The segmentation results are the red mug [SEG], the spoon [REJ].",
    "Sure, the mask of the red mug is [SEG], the mask of the spoon is [REJ].",
    "Sure, the segmentation of the red  mug is [SEG], the segmentation of the spoon. is [REJ]",
    "Sure, the referred the red mug is [SEG], the referred the spoon is [SEG].",
])
def test_a_slot_that_names_its_expression_passes_in_any_trained_answer_style(answer):
    assert miscopied_slots(answer, ["the red mug", "the spoon"]) == []


def test_a_slot_written_for_another_phrase_is_reported_with_what_was_written():
    asked = ["the red mug", "the mug"]
    # the second slot repeats the first phrase; a word inside a longer phrase is not a copy
    assert miscopied_slots("Sure, they are the red mug:[SEG], the red mug:[SEG].", asked) == [
        (1, "the red mug")]
    # phrases in another order than asked: each slot's mask would go to the other expression
    assert miscopied_slots("Sure, they are the mug:[SEG], the red mug:[SEG].", asked) == [
        (0, "the mug"), (1, "the red mug")]
    assert miscopied_slots("Sure, they are the mugs:[REJ], the mug:[SEG].", ["the mug"] * 2) == [
        (0, "the mugs")]
    # a phrase said in the previous slot's text does not count for this one
    assert miscopied_slots("Sure, they are the mug and the red mug:[SEG], [SEG].", asked) == [
        (1, "")]


def test_official_token_ids():
    seven, thirteen = gsva_7b(), gsva_13b()
    assert (seven.seg_token_id, seven.rej_token_id, seven.vocab_size) == (32003, 32004, 32005)
    assert (seven.im_start_token_id, seven.im_end_token_id) == (32001, 32002)
    assert (thirteen.seg_token_id, thirteen.rej_token_id) == (32000, 32001)
    assert (thirteen.im_start_token_id, thirteen.im_end_token_id, thirteen.vocab_size) == (
        32002,
        32003,
        32004,
    )
    assert seven.num_image_tokens == 256 and seven.sam_embedding_size == 64


def test_tiny_tokenizer_adds_tokens_in_gsva_order(tiny_tokenizer, tiny_config):
    ids = [
        tiny_config.seg_token_id,
        tiny_config.rej_token_id,
        tiny_config.im_start_token_id,
        tiny_config.im_end_token_id,
    ]
    assert ids == list(range(len(tiny_tokenizer) - 4, len(tiny_tokenizer)))
    assert (tiny_config.bos_token_id, tiny_config.eos_token_id, tiny_config.pad_token_id) == (
        1,
        2,
        0,
    )


def test_encoded_conversation_layout(tiny_tokenizer, tiny_config):
    conv = encode_conversation(
        tiny_tokenizer, tiny_config, ["the red circle", "a knife"], [True, False]
    )
    ids = conv.ids
    assert ids[0] == tiny_config.bos_token_id and ids[-1] == tiny_config.eos_token_id
    image_pos = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    assert len(image_pos) == 256 and image_pos == list(range(image_pos[0], image_pos[0] + 256))
    assert ids[image_pos[0] - 1] == tiny_config.im_start_token_id
    assert ids[conv.prefix_len - 1] == tiny_config.im_end_token_id == ids[image_pos[-1] + 1]
    assert [ids[p] for p in conv.slot_positions] == [
        tiny_config.seg_token_id,
        tiny_config.rej_token_id,
    ]
    assert conv.prompt_len < conv.slot_positions[0]
    text = tiny_tokenizer.decode(ids[conv.prompt_len :])
    assert text.startswith(" Sure, they are the red circle:[SEG], a knife:[REJ].")
    # the prefix up to <im_end> does not depend on the command (it is cached per frame)
    other = encode_conversation(tiny_tokenizer, tiny_config, ["x"], with_answer=False)
    assert other.ids[: other.prefix_len] == ids[: conv.prefix_len]


@pytest.mark.parametrize(
    "forged", ["[SEG]", "[REJ]", "<image>", "<im_start>", "<im_end>", "</s>", "<unk>"]
)
def test_user_text_cannot_inject_special_tokens(tiny_tokenizer, tiny_config, forged):
    conv = encode_conversation(tiny_tokenizer, tiny_config, [f"the {forged} mug"], [True])
    specials = {
        tiny_config.seg_token_id: 1,
        tiny_config.rej_token_id: 0,
        tiny_config.im_start_token_id: 1,
        tiny_config.im_end_token_id: 1,
        tiny_config.eos_token_id: 1,
        IMAGE_TOKEN_INDEX: 256,
    }
    for tid, n in specials.items():
        assert conv.ids.count(tid) == n, (forged, tid)
    # raw text would have produced a special token or a second image: the guard matters
    if forged == "<image>":
        assert prompt_text([f"the {forged} mug"]).count("<image>") == 2
    elif forged != "<unk>":
        raw = tiny_tokenizer(f"the {forged} mug", add_special_tokens=False)["input_ids"]
        assert set(raw) & set(specials)
