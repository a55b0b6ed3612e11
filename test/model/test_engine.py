"""Engine: one call image + command → result; per-frame caches; errors leave it usable."""

import numpy as np
import pytest

from gsva_ros.engine import GSVAEngine, InputError
from gsva_ros.model.text import CommandError


@pytest.fixture
def engine(tiny_model, tiny_tokenizer):
    return GSVAEngine(
        tiny_model, tokenizer=tiny_tokenizer, device="cpu", dtype="float32", cache_frames=2
    )


def _same(a, b):
    assert a.response == b.response
    for x, y in zip(a.targets, b.targets, strict=True):
        assert (x.phrase, x.present) == (y.phrase, y.present)
        assert x.score == pytest.approx(y.score, abs=1e-5)
        assert (x.mask is None) == (y.mask is None)
        if x.mask is not None:
            assert np.array_equal(x.mask, y.mask)


def test_result_shape(engine, rgb_image):
    r = engine.segment(rgb_image, "the red circle, the knife")
    assert r.expressions == ["the red circle", "the knife"] and r.image_size == (120, 160)
    assert len(r.targets) == 2 and r.decoding == "slots"
    for t in r.targets:
        assert 0.5 <= t.score <= 1.0
        if t.present:
            assert t.mask.shape == (120, 160) and t.mask.dtype == np.uint8
            assert len(t.boxes) == int(t.mask.max())
        else:
            assert t.mask is None and t.boxes == []
    assert {"sam", "clip", "prefill", "decode", "masks", "total"} <= set(r.timings_ms)


def test_cache_reuse_counts_encoder_calls_and_matches_uncached(engine, rgb_image):
    first = engine.segment(rgb_image, "the red circle, the knife", frame_key="f1")
    second = engine.segment(rgb_image, "the blue square", frame_key="f1")
    third = engine.segment(rgb_image, "the red circle, the knife", frame_key="f1")
    assert (engine.stats.sam_encodes, engine.stats.clip_encodes, engine.stats.prefills) == (1, 1, 1)
    assert not first.frame_cached and second.frame_cached and third.frame_cached
    assert third.timings_ms["sam"] == 0.0
    _same(first, third)
    uncached = engine.segment(rgb_image, "the blue square")  # no frame key: nothing kept
    _same(second, uncached)
    assert engine.stats.sam_encodes == 2 and engine.cached_frames == 1


def test_eviction_and_memory_bound(engine, rgb_image):
    for k in range(5):
        engine.encode_frame(rgb_image, frame_key=k)
    assert engine.cached_frames == 2  # bounded by cache_frames
    engine.segment(rgb_image, "the knife", frame_key=4)
    assert engine.stats.cache_hits == 1
    engine.segment(rgb_image, "the knife", frame_key=0)  # evicted → re-encoded
    assert engine.stats.sam_encodes == 6


def test_same_key_with_other_image_size_is_not_reused(engine, rgb_image):
    engine.segment(rgb_image, "the knife", frame_key=1)
    r = engine.segment(rgb_image[:60], "the knife", frame_key=1)
    assert not r.frame_cached and r.image_size == (60, 160)


def test_masks_for_rejected_targets(engine, rgb_image):
    r = engine.segment(rgb_image, "a, b, c", masks_for_rejected=True)
    for t in r.targets:
        assert (t.forced_mask is not None) == (not t.present)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((1, 10, 3), np.uint8),
        np.zeros((0, 0, 3), np.uint8),
        "not an image",
    ],
)
def test_bad_images(engine, image):
    with pytest.raises(InputError):
        engine.segment(image, "the knife")


def test_bad_commands_and_options(engine, rgb_image):
    with pytest.raises(CommandError):
        engine.segment(rgb_image, "   ")
    with pytest.raises(ValueError):
        engine.segment(rgb_image, "knife", decoding="beam")


def test_failure_drops_caches_and_engine_goes_on(engine, rgb_image, monkeypatch):
    engine.segment(rgb_image, "the knife", frame_key=1)
    assert engine.cached_frames == 1

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine, "_targets", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.segment(rgb_image, "the knife", frame_key=1)
    assert engine.cached_frames == 0 and engine.stats.failures == 1
    monkeypatch.undo()
    assert len(engine.segment(rgb_image, "the knife", frame_key=1).targets) == 1


def test_presence_threshold_defaults_to_the_model_and_flips_a_decision(
    tiny_model, tiny_tokenizer, rgb_image
):
    engine = GSVAEngine(tiny_model, tokenizer=tiny_tokenizer, device="cpu", dtype="float32")
    assert engine.presence_threshold == tiny_model.config.presence_threshold == 0.5
    (t,) = engine.segment(rgb_image, "the red circle").targets
    p_seg = t.score if t.present else 1 - t.score
    # a threshold on the other side of this target's [SEG] share flips the answer
    engine.presence_threshold = (p_seg + 1) / 2 if t.present else p_seg / 2
    (u,) = engine.segment(rgb_image, "the red circle").targets
    assert u.present != t.present
    assert (u.score if u.present else 1 - u.score) == pytest.approx(p_seg, abs=1e-5)
    assert (u.mask is None) == t.present


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 1.5])
def test_presence_threshold_outside_0_1_is_refused(tiny_model, tiny_tokenizer, rgb_image, bad):
    with pytest.raises(ValueError, match="presence_threshold"):
        GSVAEngine(tiny_model, tokenizer=tiny_tokenizer, device="cpu", presence_threshold=bad)
    engine = GSVAEngine(tiny_model, tokenizer=tiny_tokenizer, device="cpu")
    engine.presence_threshold = bad
    with pytest.raises(ValueError, match="presence_threshold"):
        engine.segment(rgb_image, "the red circle")


def test_config_presence_threshold_is_validated_and_optional():
    from gsva_ros.model.config import GSVAConfig, tiny

    data = tiny().to_dict()
    assert GSVAConfig.from_dict({**data, "presence_threshold": 0.7}).presence_threshold == 0.7
    data.pop("presence_threshold")  # configs written before the field existed still load
    assert GSVAConfig.from_dict(data).presence_threshold == 0.5
    with pytest.raises(ValueError, match="presence_threshold"):
        GSVAConfig.from_dict({**data, "presence_threshold": 1.0})


def test_a_seg_with_an_empty_mask_is_reported_absent_unless_asked_not_to(
    tiny_model, tiny_tokenizer, rgb_image, monkeypatch
):

    engine = GSVAEngine(tiny_model, tokenizer=tiny_tokenizer, device="cpu", dtype="float32",
                        presence_threshold=0.01)  # every slot answers [SEG]
    real = engine._mask_logits
    first = engine.segment(rgb_image, "the red circle, the knife")
    p_seg = [t.score for t in first.targets]
    assert all(t.present for t in first.targets)

    def empty_for_the_knife(hidden, emb):
        out = real(hidden, emb)
        out[1] = -10.0  # the second slot's mask decodes to nothing
        return out

    monkeypatch.setattr(engine, "_mask_logits", empty_for_the_knife)
    res = engine.segment(rgb_image, "the red circle, the knife")
    circle, knife = res.targets
    assert circle.present and circle.score == pytest.approx(p_seg[0], abs=1e-5)
    assert not knife.present and knife.mask is None and knife.boxes == []
    assert knife.score == pytest.approx(1.0 - p_seg[1], abs=1e-5)  # the [REJ] share
    assert "reported absent: 'the knife'" in res.note and res.decoding == "slots"
    lenient = engine.segment(rgb_image, "the red circle, the knife", masks_for_rejected=True)
    assert lenient.targets[1].forced_mask is not None and not lenient.targets[1].forced_mask.any()

    engine.reject_empty_masks = False  # GSVA's answer as is: present, but nothing in the mask
    kept = engine.segment(rgb_image, "the red circle, the knife").targets[1]
    assert kept.present and kept.boxes == [] and not kept.binary_mask.any()
