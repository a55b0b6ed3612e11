"""Behaviour of the gsva node over real topics and services (one shared node, `once` mode).

The model is a random tiny GSVA, so answers are arbitrary: these tests check the contract
(headers, one answer per command and per expression, errors, flow control), not accuracy.
Test order matters for the first test only (it needs a node that has seen no image yet).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from rcl_interfaces.srv import SetParameters
from rclpy.parameter import Parameter

from gsva_ros.result import Box, SegmentationResult, Target
from gsva_ros.ros import node as node_module


@pytest.fixture(scope="module")
def h(harness_factory):
    return harness_factory()


def _good(h) -> None:
    h.publish_image()


# --------------------------------------------------------------------------- no image yet
def test_no_image_yet_is_an_error_on_topic_and_service(h):
    answer = h.ask("the red mug")
    assert "no image received on" in answer.error and "/image" in answer.error
    assert answer.targets == [] and answer.header.frame_id == ""
    reply = h.call_segment("the spoon")  # 0x0 request image = latest frame, which is missing
    assert "no image received" in reply.error


# --------------------------------------------------------------------------- happy path
def test_image_and_command_give_one_segmentation_with_the_image_header(h, helpers):
    img = h.publish_image(h.make_image(frame_id="wrist_cam"))
    command = "the red mug, the spoon and the knife"
    answer = h.ask(command)
    assert answer.error == ""
    assert helpers.same_header(answer.header, img.header)
    assert answer.command == command
    assert [t.phrase for t in answer.targets] == ["the red mug", "the spoon", "the knife"]
    assert answer.response
    assert answer.latency_ms > 0
    for t in answer.targets:
        assert 0.0 <= t.score <= 1.0
        if t.present:
            assert (t.mask.height, t.mask.width, t.mask.encoding) == (48, 64, "mono8")
        else:
            assert (t.mask.height, t.mask.width) == (0, 0) and len(t.objects) == 0


def test_second_command_on_same_frame_reuses_the_frame_cache(h, helpers):
    img = h.publish_image()
    first = h.ask("the mug")
    hits = h.node._engine.stats.cache_hits
    second = h.ask("the spoon and the mug")
    assert h.node._engine.stats.cache_hits == hits + 1
    assert helpers.same_header(first.header, img.header)
    assert helpers.same_header(second.header, img.header)
    assert len(second.targets) == 2


def test_answer_uses_the_latest_frame(h, helpers):
    h.publish_image()
    newest = h.publish_image()
    answer = h.ask("the knife")
    assert helpers.same_header(answer.header, newest.header)


def test_present_target_carries_a_source_size_label_mask(h, helpers, monkeypatch):
    """Force one present target (the random model rarely says [SEG]) to check the plumbing."""
    engine = h.node._engine
    real = engine.segment

    def forced(image, command, frame_key=None, **kw):
        result: SegmentationResult = real(image, command, frame_key=frame_key, **kw)
        labels = np.zeros(image.shape[:2], np.uint8)
        labels[5:15, 10:30] = 1
        labels[30:40, 40:50] = 2
        boxes = [Box(10, 5, 20, 10), Box(40, 30, 10, 10)]
        result.targets[0] = Target(result.targets[0].phrase, True, 0.9, labels, boxes)
        return result

    monkeypatch.setattr(engine, "segment", forced)
    img = h.publish_image(h.make_image(rgb=np.full((48, 64, 3), 90, np.uint8)))
    answer = h.ask("the cup and the plate")
    target = answer.targets[0]
    assert target.present and target.phrase == "the cup"
    assert (target.mask.height, target.mask.width, target.mask.encoding) == (48, 64, "mono8")
    assert helpers.same_header(target.mask.header, img.header)
    mask = np.frombuffer(target.mask.data, np.uint8).reshape(48, 64)
    assert set(np.unique(mask)) == {0, 1, 2}
    assert [(r.x_offset, r.y_offset, r.width, r.height) for r in target.objects] == [
        (10, 5, 20, 10), (40, 30, 10, 10)]
    assert len(answer.targets) == 2


# --------------------------------------------------------------------------- service
def test_service_with_request_image_uses_it_and_publishes_the_same_answer(h, helpers):
    h.publish_image()  # a camera frame exists but must not be used
    request_image = h.make_image(frame_id="request_cam", stamp=(77, 5))
    reply = h.call_segment("the bowl", request_image)
    assert reply.error == ""
    assert helpers.same_header(reply.header, request_image.header)
    published = h.wait_answers("the bowl")
    assert len(published) == 1 and helpers.same_header(published[0].header, reply.header)
    assert [t.phrase for t in published[0].targets] == [t.phrase for t in reply.targets]


def test_service_without_image_uses_the_latest_frame(h, helpers):
    latest = h.publish_image()
    reply = h.call_segment("the plate")
    assert reply.error == ""
    assert helpers.same_header(reply.header, latest.header)
    assert [t.phrase for t in reply.targets] == ["the plate"]


def test_service_with_a_bad_request_image_is_an_error(h):
    bad = h.make_image()
    bad.encoding = "yuv422"
    reply = h.call_segment("the lamp", bad)
    assert "unsupported image encoding 'yuv422'" in reply.error


# --------------------------------------------------------------------------- error paths
@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda m: setattr(m, "encoding", "16UC1"), "unsupported image encoding"),
        (lambda m: setattr(m, "step", m.width * 3 - 1), "step"),
        (lambda m: setattr(m, "data", m.data[: len(m.data) // 2]), "truncated"),
    ],
    ids=["encoding", "step", "truncated"],
)
def test_bad_image_is_answered_with_an_error_and_its_header(h, helpers, mutate, expected):
    bad = h.make_image(frame_id="broken_cam")
    mutate(bad)
    h.publish_image(bad)
    command = f"the thing behind the {expected} image"
    answer = h.ask(command)
    assert expected in answer.error
    assert helpers.same_header(answer.header, bad.header)
    assert answer.targets == []
    _good(h)
    assert h.ask(f"{command} again").error == ""


@pytest.mark.parametrize(
    "command, expected",
    [
        ("", "command is empty"),
        ("   ", "command is empty"),
        ("x" * 501, "the limit is 500"),
        ("a, b, c, d, e, f", "6 expressions; the limit is 5"),
    ],
    ids=["empty", "blank", "oversize", "too-many-expressions"],
)
def test_bad_command_is_answered_with_an_error(h, command, expected):
    _good(h)
    answer = h.ask(command)
    assert expected in answer.error
    assert answer.targets == []


def test_runtime_limits_apply_to_commands(h):
    _good(h)
    h.set_params(max_expressions=2)
    try:
        assert "3 expressions; the limit is 2" in h.ask("a cat, a dog and a bird").error
        assert h.ask("a cat and a dog").error == ""
    finally:
        h.set_params(max_expressions=5)


def test_image_too_old_and_unstamped_are_refused(h, helpers):
    h.set_params(max_image_age_s=1.0)
    try:
        now = h.node.get_clock().now().seconds_nanoseconds()
        old = h.publish_image(h.make_image(stamp=(now[0] - 10, now[1])))
        answer = h.ask("the old mug")
        assert "image is too old" in answer.error
        assert helpers.same_header(answer.header, old.header)
        h.publish_image(h.make_image(stamp=(0, 0)))
        assert "no timestamp" in h.ask("the unstamped mug").error
        fresh = h.publish_image(h.make_image(stamp=h.node.get_clock().now().seconds_nanoseconds()))
        answer = h.ask("the fresh mug")
        assert answer.error == "" and helpers.same_header(answer.header, fresh.header)
    finally:
        h.set_params(max_image_age_s=0.0)


def test_image_age_is_measured_with_the_node_clock_under_sim_time(h, helpers):
    from rosgraph_msgs.msg import Clock

    clock_pub = h.client.create_publisher(Clock, "/clock", 10)
    h.set_params(use_sim_time=True, max_image_age_s=1.0)
    try:
        h.wait_until(lambda: clock_pub.get_subscription_count() > 0, 10.0, "/clock subscriber")
        sim = Clock()
        sim.clock.sec = 500

        def clock_at_500() -> bool:
            clock_pub.publish(sim)
            return h.node.get_clock().now().nanoseconds == 500 * 10**9

        h.wait_until(clock_at_500, 10.0, "the node clock to follow /clock", period=0.05)
        recent = h.publish_image(h.make_image(stamp=(499, 500_000_000)))  # 0.5 s old in sim
        answer = h.ask("the simulated mug")
        assert answer.error == "" and helpers.same_header(answer.header, recent.header)
        h.publish_image(h.make_image(stamp=(495, 0)))  # 5 s old in sim time
        assert "image is too old (5.00 s" in h.ask("the stale simulated mug").error
    finally:
        h.set_params(use_sim_time=False, max_image_age_s=0.0)
        h.client.destroy_publisher(clock_pub)


def test_model_exception_is_reported_and_the_next_command_works(h, monkeypatch):
    engine = h.node._engine
    real_segment, real_clear = engine.segment, engine.clear_cache
    calls = {"segment": 0, "clear": 0}

    def failing_once(*args, **kwargs):
        calls["segment"] += 1
        if calls["segment"] == 1:
            raise RuntimeError("injected CUDA out of memory")
        return real_segment(*args, **kwargs)

    def counting_clear():
        calls["clear"] += 1
        real_clear()

    monkeypatch.setattr(engine, "segment", failing_once)
    monkeypatch.setattr(engine, "clear_cache", counting_clear)
    _good(h)
    answer = h.ask("the failing mug")
    assert answer.error == "model failure: RuntimeError: injected CUDA out of memory"
    assert calls["clear"] == 1
    assert h.ask("the working mug").error == ""


# --------------------------------------------------------------------------- flow control
def test_command_flood_every_command_gets_exactly_one_answer(h):
    _good(h)
    h.set_params(command_queue_size=4)
    try:
        commands = [f"flood object {i}" for i in range(40)]
        for c in commands:
            h.command(c)
        h.wait_until(lambda: all(h.answers(c) for c in commands), 120.0, "40 answers")
        time.sleep(0.5)
        answers = [h.answers(c) for c in commands]
        assert all(len(a) == 1 for a in answers), "each command exactly one Segmentation"
        errors = [a[0].error for a in answers]
        answered = [e for e in errors if e == ""]
        refused = [e for e in errors if e == "command queue full (4)"]
        assert len(answered) + len(refused) == 40, set(errors)
        assert answered and refused
    finally:
        h.set_params(command_queue_size=10)


def test_service_parameters_and_commands_stay_responsive_during_inference(h, monkeypatch):
    engine = h.node._engine
    real = engine.segment
    started, release = threading.Event(), threading.Event()

    def slow(*args, **kwargs):
        started.set()
        release.wait(30.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "segment", slow)
    params = h.client.create_client(SetParameters, f"{h.namespace}/gsva/set_parameters")
    assert params.wait_for_service(timeout_sec=10.0)
    _good(h)
    h.set_params(command_queue_size=1)
    try:
        h.command("the slow cup")
        assert started.wait(10.0), "inference did not start"
        t0 = time.monotonic()
        future = params.call_async(SetParameters.Request(
            parameters=[Parameter("max_rate_hz", value=3.0).to_parameter_msg()]))
        h.wait_until(future.done, 5.0, "the parameter service during inference")
        assert future.result().results[0].successful
        h.command("the queued cup")  # fills the queue (size 1)
        h.wait_until(lambda: h.node.stats()["queue_depth"] == 1, 5.0, "a queued command")
        h.command("the refused cup")
        refused = h.wait_answers("the refused cup", timeout=5.0)[0]
        assert refused.error == "command queue full (1)"
        reply = h.call_segment("the refused service cup", timeout=5.0)
        assert reply.error == "command queue full (1)"
        assert time.monotonic() - t0 < 5.0
    finally:
        release.set()
        h.set_params(command_queue_size=10, max_rate_hz=2.0)
    assert h.wait_answers("the slow cup")[0].error == ""
    assert h.wait_answers("the queued cup")[0].error == ""
    h.client.destroy_client(params)


def test_continuous_mode_answers_new_frames_rate_limited(h, helpers):
    h.set_params(mode="continuous", max_rate_hz=2.0)
    command = "the moving mug"
    try:
        h.publish_image()
        h.command(command)
        h.wait_answers(command)
        start = time.monotonic()
        sent = []
        while time.monotonic() - start < 4.0:
            sent.append(h.publish_image(wait=False))
            time.sleep(0.1)
        time.sleep(1.5)  # let the last frame in flight finish
        elapsed = time.monotonic() - start
        answers = h.answers(command)
        # Several distinct frames answered, never more than the rate allows (+1 for the
        # command's own answer, +1 for a boundary).
        assert len(answers) >= 3
        assert len(answers) <= 2.0 * elapsed + 2
        stamps = {(a.header.stamp.sec, a.header.stamp.nanosec) for a in answers}
        assert len(stamps) == len(answers), "each continuous answer is for a new frame"
        sent_stamps = {(m.header.stamp.sec, m.header.stamp.nanosec) for m in sent}
        assert len(stamps & sent_stamps) >= 2
        assert h.node.stats()["dropped_frames"] > 0
    finally:
        h.set_params(mode="once")
    settled = len(h.answers(command))
    h.publish_image()
    h.publish_image()
    time.sleep(1.5)
    assert len(h.answers(command)) == settled, "once mode: no more answers to the old command"


def test_continuous_invalid_command_stops_the_standing_command(h):
    h.set_params(mode="continuous", max_rate_hz=0.0)
    try:
        h.publish_image()
        h.command("the tracked cup")
        h.wait_answers("the tracked cup")
        assert h.node.stats()["standing_command"] == "the tracked cup"
        assert "command is empty" in h.ask("").error
        assert h.node.stats()["standing_command"] == ""
        n = len(h.answers("the tracked cup"))
        h.publish_image()
        time.sleep(1.0)
        assert len(h.answers("the tracked cup")) == n
    finally:
        h.set_params(mode="once", max_rate_hz=2.0)


# --------------------------------------------------------------------------- outputs
def test_overlay_is_only_computed_while_subscribed(h, helpers, monkeypatch):
    drawn = []
    real_overlay = node_module.overlay
    monkeypatch.setattr(node_module, "overlay",
                        lambda rgb, result: drawn.append(1) or real_overlay(rgb, result))
    _good(h)
    assert h.ask("no overlay wanted").error == ""
    assert drawn == []
    h.subscribe_overlay()
    try:
        img = h.publish_image()
        assert h.ask("overlay wanted").error == ""
        got = h.wait_until(lambda: list(h.overlays), 10.0, "an overlay image")
        assert drawn == [1]
        assert (got[0].encoding, got[0].height, got[0].width) == ("rgb8", 48, 64)
        assert helpers.same_header(got[0].header, img.header)
        h.set_params(publish_overlay=False)
        assert h.ask("overlay switched off").error == ""
        assert drawn == [1]
    finally:
        h.set_params(publish_overlay=True)
        h.unsubscribe_overlay()


def test_diagnostics_are_published(h):
    def gsva_status():
        for array in reversed(h.diagnostics):
            for status in array.status:
                if status.name == "gsva: segmentation":
                    return status
        return None

    status = h.wait_until(gsva_status, 10.0, "a gsva diagnostics status")
    keys = {kv.key for kv in status.values}
    assert {
        "processing_rate_hz", "latency_p50_ms", "latency_p95_ms", "dropped_frames",
        "queue_depth", "commands_answered", "commands_errored", "model", "device", "dtype",
    } <= keys
    values = {kv.key: kv.value for kv in status.values}
    assert values["device"] == "cpu" and values["dtype"] == "float32"
    assert int(values["commands_answered"]) > 0 and int(values["commands_errored"]) > 0


def test_runtime_parameter_change_through_the_node_api(h):
    result = h.node.set_parameters([Parameter("mode", value="sometimes")])[0]
    assert not result.successful and "mode" in result.reason
    assert h.node.get_parameter("mode").value == "once"


# --------------------------------------------------------------------------- presence threshold
def test_presence_threshold_parameter_moves_the_decision_and_0_restores_the_model_s(h):
    h.publish_image()
    # the threshold alone decides here: a [SEG] whose mask keeps nothing would read absent
    h.set_params(reject_empty_masks=False)
    try:
        first = h.ask("the red mug").targets[0]
        p_seg = first.score if first.present else 1.0 - first.score
        h.set_params(presence_threshold=(p_seg + 1) / 2 if first.present else p_seg / 2)
        flipped = h.ask("the red mug").targets[0]
        assert flipped.present != first.present
        h.set_params(presence_threshold=0.0)  # back to the model's own threshold
        again = h.ask("the red mug").targets[0]
        assert again.present == first.present
        assert again.score == pytest.approx(first.score, abs=1e-4)
    finally:
        h.set_params(presence_threshold=0.0, reject_empty_masks=True)


def test_an_empty_seg_mask_is_published_absent_with_a_note_unless_reject_empty_masks_is_off(
    h, monkeypatch
):
    engine = h.node._engine
    real = engine._mask_logits

    def nothing_found(hidden, emb):
        return real(hidden, emb) * 0.0 - 10.0  # every slot's mask decodes to nothing

    monkeypatch.setattr(engine, "_mask_logits", nothing_found)
    h.publish_image()
    try:
        h.set_params(presence_threshold=0.001)  # every slot answers [SEG]
        answer = h.ask("the red mug, the spoon")
        assert answer.error == "" and "[SEG]" in answer.response
        assert [t.present for t in answer.targets] == [False, False]
        assert "reported absent" in answer.note and "'the spoon'" in answer.note
        h.set_params(reject_empty_masks=False)  # GSVA's answer as is
        kept = h.ask("the red mug, the spoon")
        assert [t.present for t in kept.targets] == [True, True] and kept.note == ""
        assert all(len(t.objects) == 0 and not any(t.mask.data) for t in kept.targets)
    finally:
        h.set_params(presence_threshold=0.0, reject_empty_masks=True)


def test_a_generated_answer_naming_another_phrase_is_answered_by_slot_decoding_with_a_note(
    h, monkeypatch
):
    import torch

    from gsva_ros import engine as engine_module
    from gsva_ros.model.decoding import Generation, SlotDecision

    engine = h.node._engine
    written = "Sure, they are the spoon:[SEG], the spoon:[SEG]"  # "the red mug" never written
    ids = engine.tokenizer(" " + written, add_special_tokens=False)["input_ids"]
    decision = SlotDecision(present=True, score=0.9, argmax_is_slot=True,
                            hidden=torch.zeros(engine.config.hidden_size))

    def miscopying_generate(*args, **kwargs):
        return Generation(list(ids), [decision, decision], True)

    monkeypatch.setattr(engine_module, "generate", miscopying_generate)
    h.publish_image()
    try:
        h.set_params(decoding="generate")
        answer = h.ask("the red mug, the spoon")
        assert answer.error == ""
        assert answer.note.startswith(
            "generate wrote 'the spoon' for 'the red mug'; answered with slot decoding instead")
        assert answer.response.startswith("Sure, they are the red mug:")
        assert [t.phrase for t in answer.targets] == ["the red mug", "the spoon"]
        h.set_params(check_generated_phrases=False)  # the answer as written
        kept = h.ask("the red mug, the spoon")
        assert kept.error == "" and kept.response == written
        assert "generate wrote" not in kept.note
    finally:
        h.set_params(decoding="slots", check_generated_phrases=True)
