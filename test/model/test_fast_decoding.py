"""Fast paths equal the reference: speculative slots, the static KV cache (padded or not),
SAM's SDPA attention; plus the engine's cache memory bound, warm-up, encode_frame and the
quantize option. Everything runs on CPU; no timing is asserted anywhere.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import numpy as np
import pytest
import torch

from gsva_ros.engine import GSVAEngine, resolve_compile, sam_pixels
from gsva_ros.model.decoding import (
    CapacityError,
    DynamicState,
    StaticLM,
    decode_slots,
    decode_slots_speculative,
    generate,
)
from gsva_ros.model.gsva import GSVAModel, QuantizationError, quantize_language_model
from gsva_ros.model.preprocess import sam_preprocess
from gsva_ros.model.prompt import encode_conversation

ATOL = 1e-5
PATTERNS = [
    [True, True, True, True],
    [False, False, False, False],
    [True, False, True, False],
    [False, True, True, True],
    [True, True, True, False],
    [True, False, False, True],
]


# ============================================================================ helpers
def _features(cfg, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, cfg.num_image_tokens, cfg.hidden_size, generator=g)


def _prefix_state(model, conv, feats, kind: str):
    """A language state holding the conversation's image prefix."""
    ids = torch.tensor([conv.ids[: conv.prefix_len]])
    embeds = model.embed(ids, feats)
    if kind == "dynamic":
        _, cache = model.run_language(embeds, use_cache=True)
        return DynamicState(model, cache)
    state = StaticLM(model, capacity=len(conv.ids) + 8, mode="eager", pad=kind == "padded",
                     buckets=(1, 4, 16))
    state.forward_embeds(embeds[0], exact=True)
    return state


class StateScriptedHead(torch.nn.Module):
    """lm_head that answers ``pattern[k]`` for a row equal to the reference state of slot k.

    The reference states come from one teacher-forced pass with the pattern's tokens in the
    slots, i.e. exactly the states a correct decoder must produce. Rows that match no
    reference (speculative rows computed after a slot that turns out [REJ]) get a [SEG]
    answer: the decoder must discard them. Margins differ per slot so scores are checked.
    """

    def __init__(self, cfg, references: torch.Tensor, pattern: list[bool]):
        super().__init__()
        self.cfg, self.refs, self.pattern = cfg, references, pattern
        self.calls = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        rows = h.reshape(-1, h.shape[-1])
        out = torch.full((rows.shape[0], self.cfg.vocab_size), -10.0)
        for i, row in enumerate(rows):
            match = [k for k, ref in enumerate(self.refs) if torch.allclose(row, ref, atol=1e-4)]
            present = self.pattern[match[0]] if match else True
            margin = 0.5 + (match[0] if match else 0)
            out[i, self.cfg.seg_token_id] = margin if present else -margin
            out[i, self.cfg.rej_token_id] = 0.0
        return out.reshape(*h.shape[:-1], -1)


@pytest.fixture
def head_swap(tiny_model):
    original = tiny_model.llava.lm_head
    yield tiny_model
    tiny_model.llava.lm_head = original


@pytest.fixture
def sam_reset(tiny_model):
    yield tiny_model
    tiny_model.set_sam_attention("reference")


def _references(model, conv, feats, pattern):
    forced = list(conv.ids)
    for p, present in zip(conv.slot_positions, pattern, strict=True):
        forced[p] = model.config.seg_token_id if present else model.config.rej_token_id
    with torch.inference_mode():
        full, _ = model.run_language(model.embed(torch.tensor([forced]), feats))
    return torch.stack([full[0, p - 1] for p in conv.slot_positions])


def _assert_same(a, b):
    assert [d.present for d in a] == [d.present for d in b]
    for x, y in zip(a, b, strict=True):
        assert x.score == pytest.approx(y.score, abs=ATOL)
        assert x.argmax_is_slot == y.argmax_is_slot
        assert torch.allclose(x.hidden, y.hidden, atol=ATOL)


# ============================================================================ speculative slots
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: "".join("S" if x else "R" for x in p))
@pytest.mark.parametrize("kind", ["dynamic", "static", "padded"])
def test_speculative_equals_incremental_for_scripted_decisions(
    tiny_model, tiny_tokenizer, head_swap, pattern, kind
):
    m, cfg = tiny_model, tiny_model.config
    conv = encode_conversation(tiny_tokenizer, cfg, ["a", "the red circle", "b", "the knife"])
    feats = _features(cfg)
    refs = _references(m, conv, feats, pattern)
    m.llava.lm_head = StateScriptedHead(cfg, refs, pattern)
    with torch.inference_mode():
        ref_stats: dict[str, int] = {}
        ref_state = _prefix_state(m, conv, feats, kind)
        ref = decode_slots(m, conv.ids, conv.slot_positions, conv.prefix_len, ref_state, ref_stats)
        spec_stats: dict[str, int] = {}
        state = _prefix_state(m, conv, feats, kind)
        spec = decode_slots_speculative(m, conv.ids, conv.slot_positions, conv.prefix_len,
                                        state, spec_stats)
    assert [d.present for d in ref] == pattern  # the script was followed
    _assert_same(ref, spec)
    for d, r in zip(spec, refs, strict=True):  # and both equal the teacher-forced states
        assert torch.allclose(d.hidden, r, atol=1e-4)
    # passes: one, plus one re-run per [REJ] that is not the last slot
    assert spec_stats["passes"] == 1 + sum(not p for p in pattern[:-1])
    assert ref_stats["passes"] == len(pattern)
    # the cache ends where the reference leaves it: up to the last slot
    assert state.length == ref_state.length == conv.slot_positions[-1]


@pytest.mark.parametrize("seed", range(4))
def test_speculative_equals_incremental_on_random_tiny_model(
    tiny_model, tiny_tokenizer, head_swap, seed
):
    """A real linear head with random [SEG]/[REJ] rows (decisions follow the hidden states)."""
    m, cfg = tiny_model, tiny_model.config
    head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g) * 0.5)
    m.llava.lm_head = head
    conv = encode_conversation(tiny_tokenizer, cfg, ["the red circle", "a", "all blue squares"])
    feats = _features(cfg, seed)
    with torch.inference_mode():
        ref = decode_slots(m, conv.ids, conv.slot_positions, conv.prefix_len,
                           _prefix_state(m, conv, feats, "dynamic"))
        for kind in ("dynamic", "static", "padded"):
            spec = decode_slots_speculative(m, conv.ids, conv.slot_positions, conv.prefix_len,
                                            _prefix_state(m, conv, feats, kind))
            _assert_same(ref, spec)


def test_speculative_with_no_slots_is_empty(tiny_model, tiny_tokenizer):
    assert decode_slots_speculative(tiny_model, [1, 2], [], 2, None) == []


# ============================================================================ static KV cache
def test_static_cache_matches_transformers_forward(tiny_model, tiny_tokenizer):
    """Prefix, then text in uneven chunks (padded to buckets or not), then one-token steps:
    every hidden state equals one teacher-forced transformers pass."""
    m, cfg = tiny_model, tiny_model.config
    conv = encode_conversation(tiny_tokenizer, cfg, ["the red circle", "the knife"])
    feats = _features(cfg)
    with torch.inference_mode():
        full, _ = m.run_language(m.embed(torch.tensor([conv.ids]), feats))
        for pad in (False, True):
            state = _prefix_state(m, conv, feats, "padded" if pad else "static")
            p = conv.prefix_len
            cuts = [p, p + 3, p + 20, len(conv.ids) - 2, len(conv.ids) - 1, len(conv.ids)]
            for a, b in zip(cuts, cuts[1:], strict=False):
                h = state.forward(conv.ids[a:b])
                assert h.shape == (b - a, cfg.hidden_size)
                assert torch.allclose(h, full[0, a:b], atol=1e-4), (pad, a, b)
            assert state.length == len(conv.ids)
            # roll back and redo a chunk: same states (stale entries are masked out)
            state.crop(p + 3)
            assert torch.allclose(state.forward(conv.ids[p + 3 : p + 20]),
                                  full[0, p + 3 : p + 20], atol=1e-4)


def test_static_prefix_save_load_and_capacity(tiny_model, tiny_tokenizer):
    m, cfg = tiny_model, tiny_model.config
    conv = encode_conversation(tiny_tokenizer, cfg, ["a"])
    with torch.inference_mode():
        state = _prefix_state(m, conv, _features(cfg, 1), "static")
        p = conv.prefix_len
        saved = state.save_prefix(p)
        assert saved.shape[-2] == p and state.nbytes > 0
        want = state.forward(conv.ids[p:])
        other = _prefix_state(m, conv, _features(cfg, 2), "static")  # another frame
        other.load_prefix(saved)  # copy-on-use: the first frame's prefix comes back
        assert other.length == p
        assert torch.allclose(other.forward(conv.ids[p:]), want, atol=1e-5)
        with pytest.raises(CapacityError):
            other.forward([5] * (other.capacity + 1))


def test_generate_on_static_cache_and_min_new_tokens(tiny_model, tiny_tokenizer, head_swap):
    m, cfg = tiny_model, tiny_model.config
    conv = encode_conversation(tiny_tokenizer, cfg, ["a"], with_answer=False)
    feats = _features(cfg)
    with torch.inference_mode():
        a = generate(m, conv.ids, conv.prefix_len, _prefix_state(m, conv, feats, "dynamic"), 6)
        b = generate(m, conv.ids, conv.prefix_len, _prefix_state(m, conv, feats, "padded"), 6)
    assert a.token_ids == b.token_ids

    class EosFirst(torch.nn.Module):  # EOS wins, token 7 second
        def forward(self, h):
            out = torch.full((*h.shape[:-1], cfg.vocab_size), -5.0)
            out[..., cfg.eos_token_id], out[..., 7] = 5.0, 1.0
            return out

    m.llava.lm_head = EosFirst()
    with torch.inference_mode():
        plain = generate(m, conv.ids, conv.prefix_len, _prefix_state(m, conv, feats, "dynamic"),
                         6)
        forced = generate(m, conv.ids, conv.prefix_len,
                          _prefix_state(m, conv, feats, "dynamic"), 6, min_new_tokens=3)
    assert plain.token_ids == [] and plain.finished
    assert forced.token_ids == [7, 7, 7] and forced.finished


def test_compile_failure_falls_back_to_eager_with_a_warning(
    tiny_model, tiny_tokenizer, monkeypatch, caplog
):
    def broken_compile(fn, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no C compiler (simulated)")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    m, cfg = tiny_model, tiny_model.config
    conv = encode_conversation(tiny_tokenizer, cfg, ["a"])
    feats = _features(cfg)
    with torch.inference_mode():
        ref = _prefix_state(m, conv, feats, "static").forward(conv.ids[conv.prefix_len:])
        state = StaticLM(m, capacity=len(conv.ids) + 8, mode="inductor", buckets=(1, 16))
        with caplog.at_level(logging.WARNING, logger="gsva_ros.model.decoding"):
            state.forward_embeds(m.embed(torch.tensor([conv.ids[: conv.prefix_len]]), feats)[0],
                                 exact=True)
        got = state.forward(conv.ids[conv.prefix_len:])
    assert state.mode == "eager" and state.fallbacks
    assert "torch.compile" in caplog.text and "simulated" in caplog.text
    assert torch.allclose(got, ref, atol=1e-4)


def test_static_modes_and_compile_option():
    cpu = torch.device("cpu")
    assert resolve_compile("auto", cpu) == "off"
    assert resolve_compile(True, cpu) == "inductor"
    assert resolve_compile(False, cpu) == "off"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_compile("graphs", cpu)
    with pytest.raises(ValueError):
        resolve_compile("fast", cpu)


# ============================================================================ SAM attention
def test_sam_attention_variants_match_segment_anything(tiny_model, sam_reset):
    m = tiny_model
    blocks = m.visual_model.image_encoder.blocks
    saved = [(b.attn.rel_pos_h.detach().clone(), b.attn.rel_pos_w.detach().clone())
             for b in blocks]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # SAM zero-initialises rel-pos; make it matter
        for b in blocks:
            b.attn.rel_pos_h.copy_(torch.randn(b.attn.rel_pos_h.shape, generator=g) * 0.5)
            b.attn.rel_pos_w.copy_(torch.randn(b.attn.rel_pos_w.shape, generator=g) * 0.5)
    try:
        s = m.config.sam_image_size
        x = torch.randn(1, 3, s, s, generator=g)
        with torch.inference_mode():
            m.set_sam_attention("reference")
            ref = m.encode_sam(x)
            m.set_sam_attention("matmul")
            same = m.encode_sam(x)
            assert m.sam_attention == "matmul"
            m.set_sam_attention("sdpa")
            fused = m.encode_sam(x)
            assert m.sam_attention == "sdpa"
        assert torch.equal(same, ref)  # same operations, same order
        assert torch.allclose(fused, ref, atol=1e-4, rtol=1e-4)
        assert set(m.state_dict()) == set(GSVAModel(m.config).state_dict())  # no new weights
        with pytest.raises(ValueError):
            m.set_sam_attention("flash")
    finally:
        with torch.no_grad():
            for b, (h, w) in zip(blocks, saved, strict=True):
                b.attn.rel_pos_h.copy_(h)
                b.attn.rel_pos_w.copy_(w)


def test_language_model_and_clip_use_sdpa(tiny_model):
    assert tiny_model.language_model.config._attn_implementation == "sdpa"
    assert tiny_model.llava.model.vision_tower.config._attn_implementation == "sdpa"


def test_sam_pixels_on_device_equal_host_preprocessing(rgb_image):
    ref, size = sam_preprocess(rgb_image, 256)
    got, size2 = sam_pixels(rgb_image, 256, torch.device("cpu"))
    assert size == size2 and got.shape == (1, 3, 256, 256)
    assert torch.equal(got[0], ref)


# ============================================================================ engine
def _engine(model, tokenizer, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", "float32")
    return GSVAEngine(model, tokenizer=tokenizer, **kw)


def _same_results(a, b):
    assert (a.response, a.decoding) == (b.response, b.decoding)
    for x, y in zip(a.targets, b.targets, strict=True):
        assert (x.present, x.phrase) == (y.present, y.phrase)
        assert x.score == pytest.approx(y.score, abs=ATOL)
        for u, v in ((x.mask, y.mask), (x.forced_mask, y.forced_mask)):
            assert (u is None) == (v is None)
            if u is not None:
                assert np.array_equal(u, v)


COMMANDS = ["the red circle, the knife", "a, b, c", "all blue squares"]


@pytest.mark.parametrize("options", [
    {"slot_decoding": "speculative"},
    {"static_cache": True},
    {"static_cache": True, "sam_attention": "matmul"},
], ids=["speculative", "static", "static+matmul"])
def test_engine_fast_options_give_the_reference_answers(
    tiny_model, tiny_tokenizer, rgb_image, sam_reset, options
):
    ref = _engine(tiny_model, tiny_tokenizer, slot_decoding="incremental", max_new_tokens=6)
    fast = _engine(tiny_model, tiny_tokenizer, max_new_tokens=6, **options)
    for _ in range(2):  # second round: cached frame
        for command in COMMANDS:
            for decoding in ("slots", "generate"):
                want = ref.segment(rgb_image, command, frame_key=1, decoding=decoding,
                                   masks_for_rejected=True)
                got = fast.segment(rgb_image, command, frame_key=1, decoding=decoding,
                                   masks_for_rejected=True)
                _same_results(want, got)
                assert got.frame_cached == want.frame_cached
    assert fast.stats.slot_passes <= ref.stats.slot_passes


def test_static_engine_survives_a_command_longer_than_its_cache(
    tiny_model, tiny_tokenizer, rgb_image
):
    prefix = encode_conversation(tiny_tokenizer, tiny_model.config, ["x"], with_answer=False)
    small = _engine(tiny_model, tiny_tokenizer, static_cache=True,
                    static_capacity=prefix.prefix_len + 20)
    ref = _engine(tiny_model, tiny_tokenizer)
    command = "the red circle, all blue squares, the purple star on the left, the knife"
    _same_results(ref.segment(rgb_image, command, frame_key=2),
                  small.segment(rgb_image, command, frame_key=2))
    assert small.stats.extra.get("static_overflows", 0) >= 1


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("GSVA_SLOW_TESTS"),
                    reason="torch.compile (inductor) of the tiny model takes > 2 min on the "
                           "2-core CI machine; set GSVA_SLOW_TESTS=1 to run it")
def test_compiled_engine_matches_eager(tiny_model, tiny_tokenizer, rgb_image):
    eager = _engine(tiny_model, tiny_tokenizer, max_new_tokens=4)
    compiled = _engine(tiny_model, tiny_tokenizer, compile=True, max_new_tokens=4)
    assert compiled.compile_mode == "inductor"
    compiled.warmup()
    for command in COMMANDS:
        _same_results(eager.segment(rgb_image, command, frame_key=3, masks_for_rejected=True),
                      compiled.segment(rgb_image, command, frame_key=3,
                                       masks_for_rejected=True))
    assert compiled._static.mode == "inductor" and not compiled.warnings


def test_cache_bytes_bounds_frame_memory(tiny_model, tiny_tokenizer, rgb_image):
    probe = _engine(tiny_model, tiny_tokenizer, cache_frames=10)
    probe.encode_frame(rgb_image, "a")
    one = probe.cache_memory_bytes
    assert one > 0 and probe.memory_report()["cache_bytes"] == one

    engine = _engine(tiny_model, tiny_tokenizer, cache_frames=10, cache_bytes=int(2.5 * one))
    for k in range(5):
        engine.encode_frame(rgb_image, k)
        assert engine.cache_memory_bytes <= int(2.5 * one)
    assert engine.cached_frames == 2 and engine.stats.evictions == 3
    assert list(engine._frames) == [3, 4]  # oldest evicted first
    report = engine.memory_report()
    assert report["cache_bytes_limit"] == int(2.5 * one) and report["cached_frames"] == 2
    assert report["model_bytes"] > 0

    tight = _engine(tiny_model, tiny_tokenizer, cache_bytes=one // 2)  # no frame fits
    r = tight.segment(rgb_image, "the knife", frame_key=9)
    assert tight.cached_frames == 0 and len(r.targets) == 1
    with pytest.raises(ValueError):
        _engine(tiny_model, tiny_tokenizer, cache_bytes=-1)


def test_encode_frame_is_cheap_when_there_is_nothing_to_do(tiny_model, tiny_tokenizer,
                                                         rgb_image):
    engine = _engine(tiny_model, tiny_tokenizer)
    assert engine.encode_frame(rgb_image, "f") is True
    assert engine.encode_frame(rgb_image, "f") is False  # already encoded
    assert engine.encode_frame(rgb_image, None) is False  # nothing could be kept
    assert (engine.stats.sam_encodes, engine.stats.cache_hits) == (1, 0)
    r = engine.segment(rgb_image, "the knife", frame_key="f")
    assert r.frame_cached and engine.stats.sam_encodes == 1

    held, release = threading.Event(), threading.Event()

    def hold():
        with engine._lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    try:
        assert engine.encode_frame(rgb_image, "g", wait=False) is False  # busy: no queueing
    finally:
        release.set()
        t.join()
    assert engine.encode_frame(rgb_image, "g", wait=False) is True


def test_warmup_leaves_no_trace_and_changes_no_answer(tiny_model, tiny_tokenizer, rgb_image):
    cold = _engine(tiny_model, tiny_tokenizer, static_cache=True, max_new_tokens=5)
    warm = _engine(tiny_model, tiny_tokenizer, static_cache=True, max_new_tokens=5)
    info = warm.warmup()
    assert info["warmup_s"] >= 0
    assert warm.cached_frames == 0 and warm.stats.commands == 0 and warm.stats.sam_encodes == 0
    assert warm.max_new_tokens == 5
    for command in COMMANDS[:2]:
        _same_results(cold.segment(rgb_image, command, frame_key=1),
                      warm.segment(rgb_image, command, frame_key=1))


# ============================================================================ quantize
def test_quantize_option_rejects_bad_values(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="quantize"):
        _engine(tiny_model, tiny_tokenizer, quantize="int4")


def test_quantize_without_bitsandbytes_fails_cleanly(tiny_model, tiny_tokenizer, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(QuantizationError, match="pip install bitsandbytes"):
        _engine(tiny_model, tiny_tokenizer, quantize="nf4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(QuantizationError, match="bitsandbytes"):
        quantize_language_model(tiny_model, "int8")


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_engine_smoke(tiny_config, tiny_tokenizer, rgb_image, mode):
    """bitsandbytes' CPU kernels: only that the layers are swapped and a command is answered."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = GSVAModel(tiny_config).eval()  # own copy: quantisation is in place
    engine = _engine(model, tiny_tokenizer, quantize=mode)
    q = engine.model.language_model.layers[0].self_attn.q_proj
    assert type(q).__module__.startswith("bitsandbytes")
    assert isinstance(engine.model.lm_head, torch.nn.Linear)  # kept in the model dtype
    assert isinstance(engine.model.text_hidden_fcs[0][0], torch.nn.Linear)
    r = engine.segment(rgb_image, "the knife, the red circle")
    assert len(r.targets) == 2 and r.response.startswith("Sure")


# ============================================================================ graph plumbing
class FakeCapturedCall:
    """CPU stand-in for a CUDA graph with the same buffer semantics: static inputs are copied
    into, and every replay overwrites the one output tensor it returns. A consumer that keeps
    a view of an output instead of a copy gets wrong answers here, as it would on a GPU."""

    def __init__(self, fn, static_inputs, pool=None, warmup: int = 2):
        self.fn, self.inputs = fn, list(static_inputs)
        for _ in range(warmup):
            fn(*self.inputs)
        self.output = fn(*self.inputs).clone()

    def __call__(self, *inputs):
        for buf, x in zip(self.inputs, inputs, strict=True):
            if x is not buf:
                buf.copy_(x)
        self.output.copy_(self.fn(*self.inputs))
        return self.output


def test_graph_path_buffers_with_a_fake_graph(tiny_model, tiny_tokenizer, rgb_image,
                                              monkeypatch, sam_reset):
    """The CUDA-graph code path (padded static chunks, per-shape captures of SAM, CLIP and the
    mask decoder, output reuse) run on CPU with a fake graph: same answers as the reference."""
    import gsva_ros.engine as engine_module
    import gsva_ros.model.decoding as decoding_module

    monkeypatch.setattr(decoding_module, "CapturedCall", FakeCapturedCall)
    monkeypatch.setattr(engine_module, "CapturedCall", FakeCapturedCall)
    ref = _engine(tiny_model, tiny_tokenizer, slot_decoding="incremental", max_new_tokens=6)
    fast = _engine(tiny_model, tiny_tokenizer, static_cache=True, sam_attention="matmul",
                   max_new_tokens=6)
    fast._static.mode, fast._static.pad = "graphs", True
    for g in (fast._encode_sam, fast._encode_clip, fast._mask_logits):
        g.enabled = True
    fast.compile_mode = "graphs"  # warm-up then captures every prompt count
    info = fast.warmup()
    assert info["graphs"] >= len(fast._static.buckets) + 2 + fast.max_expressions
    for _ in range(2):
        for command in COMMANDS:
            for decoding in ("slots", "generate"):
                _same_results(
                    ref.segment(rgb_image, command, frame_key=5, decoding=decoding,
                                masks_for_rejected=True),
                    fast.segment(rgb_image, command, frame_key=5, decoding=decoding,
                                 masks_for_rejected=True),
                )
    other = rgb_image[::-1].copy()  # a second frame: its prefix replaces the resident one
    _same_results(ref.segment(other, "the knife, a", frame_key=6),
                  fast.segment(other, "the knife, a", frame_key=6))
    _same_results(ref.segment(rgb_image, "the knife, a", frame_key=5),
                  fast.segment(rgb_image, "the knife, a", frame_key=5))
    assert not fast.warnings
