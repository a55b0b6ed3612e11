"""Lifecycle transitions and parameter validation of the gsva node, through its ROS services."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.srv import SetParameters
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter

from gsva_ros.ros.node import PARAMETERS


@pytest.fixture(scope="module")
def h(harness_factory):
    """An unconfigured node (model: the tiny test checkpoint)."""
    return harness_factory(start=False)


def call(h, client, request, what: str):
    assert client.wait_for_service(timeout_sec=10.0), f"{what} service not available"
    future = client.call_async(request)
    h.wait_until(future.done, 60.0, what)
    return future.result()


class Services:
    def __init__(self, h) -> None:
        base = f"{h.namespace}/gsva"
        self.h = h
        self.change = h.client.create_client(ChangeState, f"{base}/change_state")
        self.get = h.client.create_client(GetState, f"{base}/get_state")
        self.params = h.client.create_client(SetParameters, f"{base}/set_parameters")

    def transition(self, transition_id: int) -> bool:
        req = ChangeState.Request()
        req.transition.id = transition_id
        return call(self.h, self.change, req, f"transition {transition_id}").success

    def state(self) -> int:
        return call(self.h, self.get, GetState.Request(), "get_state").current_state.id

    def set(self, **values: Any) -> list[Any]:
        req = SetParameters.Request(
            parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
        )
        return call(self.h, self.params, req, "set_parameters").results


@pytest.fixture(scope="module")
def srv(h):
    return Services(h)


# --------------------------------------------------------------------------- parameters
BAD_VALUES = {
    "model": "",
    "device": "gpu",
    "dtype": "int8",
    "decoding": "beam",
    "mode": "sometimes",
    "max_rate_hz": -1.0,
    "max_image_age_s": "old",
    "image_qos": "best_effort",
    "min_object_area": -5,
    "max_expressions": 0,
    "max_command_chars": 0,
    "command_queue_size": 0,
}
GOOD_VALUES = {
    "decoding": "generate",
    "mode": "continuous",
    "max_rate_hz": 5,  # an integer is accepted for a float parameter
    "max_image_age_s": 0.5,
    "instance_split": False,
    "check_generated_phrases": False,
    "min_object_area": 0,
    "max_expressions": 8,
    "max_command_chars": 200,
    "publish_overlay": False,
    "command_queue_size": 3,
}


@pytest.mark.parametrize("name, value", sorted(BAD_VALUES.items()))
def test_bad_parameter_values_are_rejected_with_a_reason(srv, h, name, value):
    before = h.node.get_parameter(name).value
    (result,) = srv.set(**{name: value})
    assert not result.successful
    assert result.reason.startswith(name) and len(result.reason) > len(name) + 5
    assert h.node.get_parameter(name).value == before


def test_wrongly_typed_values_are_rejected(srv, h):
    (result,) = srv.set(min_object_area="many")  # rclpy enforces the declared integer type
    assert not result.successful and h.node.get_parameter("min_object_area").value == 32
    (result,) = srv.set(max_rate_hz=True)  # numbers only, even with dynamic typing
    assert not result.successful and "max_rate_hz" in result.reason


def test_good_parameter_values_are_accepted_at_runtime(srv, h):
    defaults = {name: h.node.get_parameter(name).value for name in GOOD_VALUES}
    results = srv.set(**GOOD_VALUES)
    assert all(r.successful for r in results), [r.reason for r in results]
    assert {n: h.node.get_parameter(n).value for n in GOOD_VALUES} == GOOD_VALUES
    assert all(r.successful for r in srv.set(**defaults))


def test_every_parameter_is_declared_with_a_description(h):
    for name, spec in PARAMETERS.items():
        descriptor = h.node.describe_parameter(name)
        assert descriptor.description == spec.description
        if name not in ("model", "device"):  # the harness overrides these two
            assert h.node.get_parameter(name).value == spec.default


# --------------------------------------------------------------------------- lifecycle
def test_configure_fails_cleanly_on_a_missing_or_corrupt_model(srv, h, tmp_path, tiny_model_dir):
    good_model = h.node.get_parameter("model").value
    assert srv.state() == State.PRIMARY_STATE_UNCONFIGURED
    try:
        assert all(r.successful for r in srv.set(model=str(tmp_path / "missing")))
        assert h.node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert srv.state() == State.PRIMARY_STATE_UNCONFIGURED
        corrupt = tmp_path / "corrupt"
        corrupt.mkdir()
        (corrupt / "config.json").write_text("{not json")
        (corrupt / "model.safetensors").write_bytes(b"\x00" * 16)
        assert all(r.successful for r in srv.set(model=str(corrupt)))
        assert not srv.transition(Transition.TRANSITION_CONFIGURE)
        assert srv.state() == State.PRIMARY_STATE_UNCONFIGURED
        assert h.node._engine is None
    finally:
        assert all(r.successful for r in srv.set(model=good_model))


def test_full_lifecycle_through_the_lifecycle_services(srv, h):
    assert srv.transition(Transition.TRANSITION_CONFIGURE)
    assert srv.state() == State.PRIMARY_STATE_INACTIVE
    assert h.node._engine is not None
    h.wait_matched()

    # Configured but inactive: commands are answered with an error, never dropped.
    assert "not active" in h.ask("the inactive mug").error

    # Reload-only parameters are refused while configured, with the way out in the reason.
    (result,) = srv.set(device="cuda")
    assert not result.successful and "cleanup" in result.reason
    (result,) = srv.set(image_qos="reliable")
    assert not result.successful and "configure" in result.reason

    assert srv.transition(Transition.TRANSITION_ACTIVATE)
    assert srv.state() == State.PRIMARY_STATE_ACTIVE
    h.publish_image()
    assert h.ask("the active mug").error == ""

    assert srv.transition(Transition.TRANSITION_DEACTIVATE)
    assert srv.state() == State.PRIMARY_STATE_INACTIVE
    assert "not active" in h.ask("the deactivated mug").error

    assert srv.transition(Transition.TRANSITION_CLEANUP)
    assert srv.state() == State.PRIMARY_STATE_UNCONFIGURED
    assert h.node._engine is None
    # Unconfigured: reload-only parameters may change again.
    (result,) = srv.set(image_qos="reliable")
    assert result.successful
    assert all(r.successful for r in srv.set(image_qos="sensor_data"))


def test_reconfigure_with_node_methods_and_pending_commands_are_answered_on_deactivate(h):
    assert h.node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert h.node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    h.wait_matched()
    h.publish_image()
    engine = h.node._engine
    release = threading.Event()
    real = engine.segment

    def blocking(*args: Any, **kwargs: Any):
        release.wait(30.0)
        return real(*args, **kwargs)

    engine.segment = blocking
    try:
        for name in ("held 1", "held 2", "held 3"):
            h.command(name)
        h.wait_until(lambda: h.node.stats()["queue_depth"] == 2, 10.0, "two queued commands")
        assert h.node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        for name in ("held 2", "held 3"):
            (answer,) = h.wait_answers(name)
            assert "deactivated" in answer.error
        release.set()
        (first,) = h.wait_answers("held 1")
        assert first.error == ""  # the command already being processed is still answered
    finally:
        release.set()
        engine.segment = real
    time.sleep(0.2)
    assert all(len(h.answers(n)) == 1 for n in ("held 1", "held 2", "held 3"))
    assert h.node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
    assert h.node._engine is None and h.node._worker is None


def test_waiting_for_the_first_image_is_logged_with_the_resolved_topic(h, monkeypatch, capfd):
    from gsva_ros.ros import node as node_module

    monkeypatch.setattr(node_module, "NO_IMAGE_WARN_S", 0.5)
    assert h.node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert h.node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    try:
        expected = f"no image received on {h.namespace}/image yet — check remapping and image_qos"
        seen = ""

        def logged() -> bool:
            nonlocal seen
            seen += capfd.readouterr().err
            return expected in seen

        h.wait_until(logged, 10.0, "the no-image warning")
    finally:
        assert h.node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert h.node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
