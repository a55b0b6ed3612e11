"""Frames are encoded while the worker is idle (``preencode``), so commands hit the cache."""

from __future__ import annotations


def test_preencoded_frame_is_reused_by_the_next_command(harness_factory, helpers):
    h = harness_factory({"preencode": True})
    engine = h.node._engine
    image = h.publish_image()
    helpers.wait_until(lambda: h.node.stats()["preencoded_frames"] >= 1, 60, "pre-encoding")
    encodes, hits = engine.stats.sam_encodes, engine.stats.cache_hits
    answer = h.ask("the red circle, the knife")
    assert answer.error == "" and helpers.same_header(answer.header, image.header)
    assert engine.stats.sam_encodes == encodes  # nothing re-encoded for the command
    assert engine.stats.cache_hits == hits + 1


def test_no_preencoding_in_once_mode_by_default(harness_factory, helpers):
    h = harness_factory()
    h.publish_image()
    answer = h.ask("the knife")
    assert answer.error == ""
    assert h.node.stats()["preencoded_frames"] == 0
    # a runtime switch turns it on for the frames that follow
    h.set_params(preencode=True)
    h.publish_image()
    helpers.wait_until(lambda: h.node.stats()["preencoded_frames"] >= 1, 60, "pre-encoding")
