"""Slot decoding and generate-mode parsing on a model whose logits the test controls."""

import numpy as np
import pytest
import torch

from gsva_ros.engine import GSVAEngine
from gsva_ros.model.decoding import decode_slots, generate
from gsva_ros.model.prompt import encode_conversation
from gsva_ros.result import FALLBACK_MISCOPIED, FALLBACK_SLOT_COUNT


class ScriptedHead(torch.nn.Module):
    """Replaces lm_head: call k returns logits from ``script[k]`` (dict token → logit)."""

    def __init__(self, vocab: int, script: list[dict[int, float]]):
        super().__init__()
        self.vocab, self.script, self.calls = vocab, script, 0

    def forward(self, h):
        out = torch.full((*h.shape[:-1], self.vocab), -10.0)
        for tok, val in self.script[min(self.calls, len(self.script) - 1)].items():
            out[..., tok] = val
        self.calls += 1
        return out


@pytest.fixture
def scripted(tiny_model):
    original = tiny_model.llava.lm_head

    def install(script):
        head = ScriptedHead(tiny_model.config.vocab_size, script)
        tiny_model.llava.lm_head = head
        return head

    yield install
    tiny_model.llava.lm_head = original


def _prefill(model, conv, image_features):
    ids = torch.tensor([conv.ids[: conv.prefix_len]])
    _, cache = model.run_language(model.embed(ids, image_features), use_cache=True)
    return cache


def test_slot_choice_score_and_hidden_position(tiny_model, tiny_tokenizer, scripted):
    cfg = tiny_model.config
    seg, rej = cfg.seg_token_id, cfg.rej_token_id
    scripted([{seg: 2.0, rej: 0.0}, {seg: -1.0, rej: 1.0}, {seg: 0.3, rej: 0.2, 5: 9.0}])
    conv = encode_conversation(tiny_tokenizer, cfg, ["a", "b", "c"])
    torch.manual_seed(1)
    feats = torch.randn(1, 256, cfg.hidden_size)
    with torch.inference_mode():
        cache = _prefill(tiny_model, conv, feats)
        dec = decode_slots(tiny_model, conv.ids, conv.slot_positions, conv.prefix_len, cache)
    assert [d.present for d in dec] == [True, False, True]
    assert dec[0].score == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item(), abs=1e-6)
    assert dec[1].score == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item(), abs=1e-6)
    assert dec[2].score == pytest.approx(torch.sigmoid(torch.tensor(0.1)).item(), abs=1e-6)
    assert [d.argmax_is_slot for d in dec] == [True, True, False]  # GSVA's criterion logged too
    # mask embedding = teacher-forced last-layer state at p-1 of each slot token
    forced = list(conv.ids)
    forced[conv.slot_positions[1]] = rej
    with torch.inference_mode():
        full, _ = tiny_model.run_language(tiny_model.embed(torch.tensor([forced]), feats))
    for d, p in zip(dec, conv.slot_positions, strict=True):
        assert torch.allclose(d.hidden, full[0, p - 1], atol=1e-4)
        assert not torch.allclose(d.hidden, full[0, p], atol=1e-3)
    # one incremental pass: three slot steps, the cache grew by exactly the fed tokens
    assert cache.get_seq_length() == conv.slot_positions[-1]


def _script_tokens(tokenizer, text):
    return [{t: 5.0} for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def test_generate_parses_slots_in_order(tiny_model, tiny_tokenizer, scripted, rgb_image):
    cfg = tiny_model.config
    script = _script_tokens(tiny_tokenizer, " Sure, they are a:[SEG], b:[REJ].") + [
        {cfg.eos_token_id: 5.0}
    ]
    scripted(script)
    engine = GSVAEngine(tiny_model, tokenizer=tiny_tokenizer, device="cpu", dtype="float32")
    res = engine.segment(rgb_image, "a, b", decoding="generate")
    assert res.decoding == "generate" and res.note == "" and res.fallback == ""
    # generation stops at the last expected slot: the closing "." is never computed
    assert res.response == "Sure, they are a:[SEG], b:[REJ]"
    assert [t.present for t in res.targets] == [True, False]
    assert res.targets[0].mask is not None and res.targets[0].mask.shape == rgb_image.shape[:2]
    assert res.targets[1].mask is None


def test_generate_falls_back_to_slots_on_wrong_slot_count(
    tiny_model, tiny_tokenizer, scripted, rgb_image
):
    cfg = tiny_model.config
    script = _script_tokens(tiny_tokenizer, " Sure, a:[SEG].") + [{cfg.eos_token_id: 5.0}]
    script += [{cfg.seg_token_id: 1.0, cfg.rej_token_id: 0.0}] * 4  # slot decoding afterwards
    scripted(script)
    engine = GSVAEngine(tiny_model, tokenizer=tiny_tokenizer, device="cpu", dtype="float32")
    res = engine.segment(rgb_image, "a, b", decoding="generate")
    assert res.decoding == "slots" and res.fallback == FALLBACK_SLOT_COUNT
    assert "1 slot(s) for 2 expression(s)" in res.note
    assert res.response == "Sure, they are a:[SEG], b:[SEG]."
    assert all(t.present for t in res.targets)


@pytest.mark.parametrize("check", [True, False])
def test_generate_falls_back_to_slots_when_a_slot_names_another_phrase(
    tiny_model, tiny_tokenizer, scripted, rgb_image, check
):
    cfg = tiny_model.config
    # the model writes "b" where "a" was asked: the first mask would follow "b"
    # (generation stops at the second slot; the calls after it are slot decoding's)
    script = _script_tokens(tiny_tokenizer, " Sure, they are b:[SEG], b:[REJ]")
    script += [{cfg.seg_token_id: 0.0, cfg.rej_token_id: 1.0}]
    scripted(script)
    engine = GSVAEngine(tiny_model, tokenizer=tiny_tokenizer, device="cpu", dtype="float32",
                        check_generated_phrases=check)
    res = engine.segment(rgb_image, "a, b", decoding="generate")
    if check:
        assert res.decoding == "slots" and res.fallback == FALLBACK_MISCOPIED
        assert res.note == "generate wrote 'b' for 'a'; answered with slot decoding instead"
        assert res.response == "Sure, they are a:[REJ], b:[REJ]."
        assert [t.present for t in res.targets] == [False, False]
    else:  # GSVA's answer as is
        assert res.decoding == "generate" and res.note == "" and res.fallback == ""
        assert res.response == "Sure, they are b:[SEG], b:[REJ]"
        assert [t.present for t in res.targets] == [True, False]


def test_generate_stops_at_max_new_tokens(tiny_model, tiny_tokenizer, scripted):
    cfg = tiny_model.config
    scripted([{7: 3.0}])  # never EOS
    conv = encode_conversation(tiny_tokenizer, cfg, ["a"], with_answer=False)
    with torch.inference_mode():
        cache = _prefill(tiny_model, conv, torch.zeros(1, 256, cfg.hidden_size))
        gen = generate(tiny_model, conv.ids, conv.prefix_len, cache, max_new_tokens=5)
    assert gen.token_ids == [7] * 5 and not gen.finished and gen.slots == []
    assert np.isfinite(cache.get_seq_length())


def test_engine_cuts_a_looping_generation_after_the_answer_length(
    tiny_model, tiny_tokenizer, scripted, rgb_image
):
    from gsva_ros.engine import GENERATE_MARGIN

    cfg = tiny_model.config
    loop = tiny_tokenizer(" a", add_special_tokens=False)["input_ids"][0]
    head = scripted([{loop: 5.0}])  # never EOS, never a slot: then slot decoding answers
    engine = GSVAEngine(tiny_model, tokenizer=tiny_tokenizer, device="cpu", dtype="float32",
                        max_new_tokens=200)
    conv = encode_conversation(tiny_tokenizer, cfg, ["a", "b"])
    budget = engine.generate_budget(conv)
    assert budget == len(conv.ids) - conv.prompt_len + GENERATE_MARGIN < 200
    head.calls = 0
    res = engine.segment(rgb_image, "a, b", decoding="generate")
    assert res.decoding == "slots" and "0 slot(s) for 2 expression(s)" in res.note
    # the prompt step and `budget` generated tokens, then the slot pass (not 200 steps)
    assert budget + 1 <= head.calls < budget + 1 + 6
    # the cap never undercuts min_new_tokens (benchmarks force a token count with it)
    forced = GSVAEngine(tiny_model, tokenizer=tiny_tokenizer, device="cpu", dtype="float32",
                        max_new_tokens=500, min_new_tokens=300)
    assert forced.generate_budget(conv) == 300


def test_generate_stops_once_every_expression_has_its_slot(
    tiny_model, tiny_tokenizer, scripted, rgb_image
):
    cfg = tiny_model.config
    # a talkative model: after the two asked-for slots it invents a third phrase and slot
    script = _script_tokens(tiny_tokenizer, " Sure, they are a:[SEG], b:[SEG], c:[REJ].")
    head = scripted(script + [{cfg.eos_token_id: 5.0}])
    engine = GSVAEngine(tiny_model, tokenizer=tiny_tokenizer, device="cpu", dtype="float32")
    head.calls = 0
    res = engine.segment(rgb_image, "a, b", decoding="generate")
    assert res.decoding == "generate" and res.note == ""
    assert res.response == "Sure, they are a:[SEG], b:[SEG]"
    assert [t.present for t in res.targets] == [True, True]
    n_answer = len(tiny_tokenizer(" Sure, they are a:[SEG], b:[SEG]", add_special_tokens=False)
                   ["input_ids"])
    assert head.calls == n_answer  # one LLM step per token up to the last slot, no more


@pytest.mark.parametrize("speculative", [False, True])
def test_presence_threshold_moves_the_slot_decision(
    tiny_model, tiny_tokenizer, scripted, speculative
):
    from gsva_ros.model.decoding import decode_slots_speculative

    cfg = tiny_model.config
    seg, rej = cfg.seg_token_id, cfg.rej_token_id
    p_seg = [torch.sigmoid(torch.tensor(x)).item() for x in (0.4, 2.0, -0.2)]  # .60 .88 .45
    conv = encode_conversation(tiny_tokenizer, cfg, ["a", "b", "c"])
    decode = decode_slots_speculative if speculative else decode_slots
    chosen = {}
    for threshold in (0.5, 0.7, 0.9, 0.3):
        # every forward answers with the same per-slot logits, whatever the pass
        scripted([{seg: 0.4, rej: 0.0}, {seg: 2.0, rej: 0.0}, {seg: -0.2, rej: 0.0}] * 8)
        if speculative:  # one pass scores all slots at once: script one row per slot
            tiny_model.llava.lm_head.forward = _per_row_head(cfg.vocab_size, [0.4, 2.0, -0.2],
                                                             seg, rej)
        with torch.inference_mode():
            cache = _prefill(tiny_model, conv, torch.zeros(1, 256, cfg.hidden_size))
            dec = decode(tiny_model, conv.ids, conv.slot_positions, conv.prefix_len, cache,
                         presence_threshold=threshold)
        chosen[threshold] = [d.present for d in dec]
        for d, p in zip(dec, p_seg, strict=True):  # the score is the chosen side's share
            assert d.score == pytest.approx(p if d.present else 1 - p, abs=1e-6)
    assert chosen[0.5] == [True, True, False]  # GSVA's rule: the larger logit wins
    assert chosen[0.7] == [False, True, False]
    assert chosen[0.9] == [False, False, False]
    assert chosen[0.3] == [True, True, True]


def _per_row_head(vocab, seg_logits, seg, rej):
    """lm_head stand-in for the speculative decoder: each call scores the slots still open,
    which are always the last ``rows`` ones, so row r is slot ``n - rows + r``."""

    def forward(h):
        rows = h.reshape(-1, h.shape[-1]).shape[0]
        out = torch.full((rows, vocab), -10.0)
        for r in range(rows):
            out[r, seg], out[r, rej] = seg_logits[len(seg_logits) - rows + r], 0.0
        return out.reshape(*h.shape[:-1], vocab)

    return forward


def test_generate_applies_the_presence_threshold_to_a_slot(tiny_model, tiny_tokenizer, scripted):
    cfg = tiny_model.config
    seg, rej = cfg.seg_token_id, cfg.rej_token_id
    conv = encode_conversation(tiny_tokenizer, cfg, ["a"], with_answer=False)
    out = {}
    for threshold in (0.5, 0.8):
        scripted([{seg: 5.0, rej: 4.0}, {cfg.eos_token_id: 5.0}])  # p(SEG) = 0.73
        with torch.inference_mode():
            cache = _prefill(tiny_model, conv, torch.zeros(1, 256, cfg.hidden_size))
            gen = generate(tiny_model, conv.ids, conv.prefix_len, cache, max_new_tokens=4,
                           presence_threshold=threshold)
        out[threshold] = gen
    assert out[0.5].token_ids == [seg] and out[0.5].slots[0].present
    # the emitted token follows the decision, so the answer text says [REJ] too
    assert out[0.8].token_ids == [rej] and not out[0.8].slots[0].present
