"""Faults: failures inside inference, broken model directories, invalid parameter changes.

- An exception or a CUDA out-of-memory error inside inference costs exactly that command (an
  error Segmentation), the frame caches are dropped, and the node answers the next command.
- A missing or corrupt model directory fails configure (lifecycle) or exits the plain node
  with status 1 and a message naming the problem.
- An invalid parameter change is refused with a reason and changes nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter

import gsva_ros.engine as engine_module
from gsva_ros.model.checkpoint import CheckpointError, load_checkpoint

GSVA_ROS = Path(sys.executable).parent / "gsva-ros"


@pytest.fixture(scope="module")
def h(harness_factory):
    return harness_factory()


@pytest.fixture(scope="module")
def lc(harness_factory):
    """An unconfigured lifecycle node for configure failures."""
    return harness_factory(start=False)


# ===================================================================== faults inside inference
class Injected:
    """Make one call of ``target.name`` raise ``exc``; count ``engine.clear_cache`` calls."""

    def __init__(self, monkeypatch, engine, target, name: str, exc: BaseException) -> None:
        self.raised = 0
        self.cleared = 0
        real = getattr(target, name)
        real_clear = engine.clear_cache

        def failing(*args, **kwargs):
            if not self.raised:
                self.raised += 1
                raise exc
            return real(*args, **kwargs)

        def clear() -> None:
            self.cleared += 1
            real_clear()

        monkeypatch.setattr(target, name, failing)
        monkeypatch.setattr(engine, "clear_cache", clear)


def test_cuda_out_of_memory_in_decoding_errors_one_command_and_drops_caches(
    h, monkeypatch, capfd
):
    engine = h.node._engine
    h.publish_image()
    assert h.ask("the cached mug").error == ""
    assert engine.cached_frames >= 1  # the frame whose KV cache the failure must not poison
    failures = engine.stats.failures
    oom = torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)")
    # lm_head runs in every decoding path (slot choice logits), after the frame is cached.
    injected = Injected(monkeypatch, engine, engine.model.lm_head, "forward", oom)
    capfd.readouterr()
    answer = h.ask("the mug that runs out of memory")  # same frame: a cache hit, then OOM
    log = capfd.readouterr().err
    assert injected.raised == 1
    assert answer.error.startswith("model failure: OutOfMemoryError: CUDA out of memory")
    assert answer.targets == []
    assert injected.cleared >= 1 and engine.cached_frames == 0
    assert engine.stats.failures == failures + 1
    assert "model failure on command" in log and "OutOfMemoryError" in log
    assert h.node.stats()["last_error"] == answer.error
    # The node goes on: same frame (encoded again), then a new one.
    assert h.ask("the mug after the out-of-memory error").error == ""
    assert engine.cached_frames == 1
    h.publish_image()
    answer = h.ask("the red mug, the spoon and the knife")
    assert answer.error == "" and len(answer.targets) == 3
    assert h.node.stats()["last_error"] == ""


def _clip_preprocess(engine):
    return engine_module, "clip_preprocess"


def _lm_head(engine):
    return engine.model.lm_head, "forward"


@pytest.mark.parametrize("where", [_clip_preprocess, _lm_head], ids=["frame-encoding", "decoding"])
@pytest.mark.parametrize(
    "exc, prefix",
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"),
         "model failure: RuntimeError"),
        (ValueError("shapes do not match"), "model failure: ValueError"),
        (KeyError("missing key"), "model failure: KeyError"),
        (IndexError("index 9 is out of bounds"), "model failure: IndexError"),
        (AssertionError(), "model failure: AssertionError"),
        # Not an Exception: the worker's last-resort handler must still answer.
        (KeyboardInterrupt(), "internal error: KeyboardInterrupt"),
    ],
    ids=["runtime", "value", "key", "index", "assertion", "keyboard-interrupt"],
)
def test_any_exception_inside_inference_costs_one_command_only(h, monkeypatch, where, exc,
                                                               prefix):
    engine = h.node._engine
    h.publish_image()  # a new frame: frame encoding runs for the failing command
    target, name = where(engine)
    injected = Injected(monkeypatch, engine, target, name, exc)
    answer = h.ask(f"the {prefix.split()[-1].lower()} mug")
    assert injected.raised == 1
    assert answer.error.startswith(prefix), answer.error
    if isinstance(exc, Exception):
        assert injected.cleared >= 1 and engine.cached_frames == 0
    answer = h.ask("the mug, the spoon and the knife")
    assert answer.error == "" and len(answer.targets) == 3


# ===================================================================== broken model directories
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


class Payload:
    """Unpickling this runs ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _tokenizer_of_another_model(d: Path) -> None:
    from gsva_ros.model.tokenizer import build_tiny_tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    build_tiny_tokenizer(["another corpus entirely"], vocab_size=400).save_pretrained(d)


def _drop_one_tensor(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    state.pop(sorted(state)[0])
    save_file(state, str(d / "model.safetensors"))


# name → (how to break a copy of the good model, substring the log/stderr must contain)
BREAKAGES: dict[str, tuple[Callable[[Path], object], str]] = {
    "missing-dir": (lambda d: shutil.rmtree(d), "does not exist"),
    "empty-dir": (lambda d: [p.unlink() for p in d.iterdir()], "has no config.json"),
    "dir-is-a-file": (lambda d: (shutil.rmtree(d), d.write_text("not a directory")),
                      "does not exist"),
    "no-config": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
    "truncated-weights": (
        lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:50_000]),
        "model.safetensors: Error while deserializing header"),
    "garbage-weights": (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64),
                        "model.safetensors: Error while deserializing header"),
    "empty-weights": (lambda d: (d / "model.safetensors").write_bytes(b""),
                      "model.safetensors: Error while deserializing header"),
    "pickle-as-weights": (
        lambda d: torch.save({"x": Payload(d.parent / "pwned")}, d / "model.safetensors"),
        "model.safetensors: Error while deserializing header"),
    "config-not-json": (lambda d: (d / "config.json").write_text("{not json"),
                        "config.json: Expecting property name"),
    "config-unknown-field": (
        lambda d: (d / "config.json").write_text(json.dumps({**_config(d), "evil": 1})),
        "unknown GSVA config fields: evil"),
    "config-wrong-geometry": (
        lambda d: (d / "config.json").write_text(json.dumps({**_config(d), "hidden_size": 64})),
        "tensor shapes differ"),
    "no-tokenizer": (
        lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
        "cannot load the tokenizer"),
    "tokenizer-garbage": (lambda d: (d / "tokenizer.json").write_text("{garbage"),
                          "cannot load the tokenizer"),
    "tokenizer-mismatch": (_tokenizer_of_another_model, "tokenizer and model config disagree"),
    "missing-tensor": (_drop_one_tensor, "weights do not match config.json: 1 missing"),
}


@pytest.fixture(scope="module")
def broken(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """One broken copy of the tiny model per BREAKAGES entry."""
    root = tmp_path_factory.mktemp("broken_models")
    out = {}
    for name, (breakage, _) in BREAKAGES.items():
        d = _copy(tiny_model_dir, root / name)
        breakage(d)
        out[name] = d
    return out


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_broken_model_directory_fails_configure_with_a_clear_message(lc, broken, name, capfd):
    model = str(broken[name])
    assert lc.node.set_parameters([Parameter("model", value=model)])[0].successful
    capfd.readouterr()
    assert lc.node.trigger_configure() == TransitionCallbackReturn.FAILURE
    log = capfd.readouterr().err
    assert lc.node._engine is None and lc.node._worker is None
    assert lc.node._state_machine.current_state[1] == "unconfigured"
    assert "cannot load model" in log and model in log
    assert BREAKAGES[name][1] in log, log[-1500:]
    assert not (broken[name].parent / "pwned").exists()  # nothing was unpickled


def test_node_configures_after_broken_models_once_the_model_is_fixed(lc, tiny_model_dir):
    assert lc.node.set_parameters([Parameter("model", value=str(tiny_model_dir))])[0].successful
    assert lc.node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    try:
        assert lc.node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        lc.wait_matched()
        lc.publish_image()
        assert lc.ask("the repaired mug").error == ""
    finally:
        lc.node.trigger_deactivate()
        lc.node.trigger_cleanup()


# A missing directory is covered by test_entrypoints.py.
PLAIN_NODE_CASES = ["truncated-weights", "config-not-json", "tokenizer-mismatch"]


def test_plain_node_exits_non_zero_with_the_reason_on_broken_models(broken):
    """``gsva-ros node`` as a robot would start it; the processes run in parallel."""
    procs = {
        name: subprocess.Popen(
            [str(GSVA_ROS), "node", "--ros-args", "-p", f"model:={broken[name]}",
             "-p", "device:=cpu", "-r", f"__ns:=/faults_{i}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i, name in enumerate(PLAIN_NODE_CASES)
    }
    results = {}
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        results[name] = (proc.returncode, err)
    for name, (rc, err) in results.items():
        assert rc == 1, (name, rc, err[-1500:])
        assert "cannot load model" in err and str(broken[name]) in err, (name, err[-1500:])
        assert BREAKAGES[name][1] in err, (name, err[-1500:])
        assert "configure failed" in err, (name, err[-1500:])
        assert "Traceback" not in err, (name, err[-1500:])


# ------------------------------------------------------------------ loader-level message quality
def _write_config(text: str | bytes) -> Callable[[Path], None]:
    def write(d: Path) -> None:
        target = d / "config.json"
        target.write_bytes(text) if isinstance(text, bytes) else target.write_text(text)

    return write


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(_write_config("{not json"), id="not-json"),
        pytest.param(_write_config("[1, 2]"), id="json-array"),
        pytest.param(_write_config('"hello"'), id="json-string"),
        pytest.param(_write_config(b"\xff\xfe garbage"), id="not-utf8"),
        pytest.param(lambda d: _write_config(json.dumps({**_config(d), "hidden_size": "big"}))(d),
                     id="wrong-type"),
    ],
)
def test_unreadable_config_json_is_a_checkpoint_error_naming_the_file(
    tiny_model_dir, tmp_path, breakage
):
    d = _copy(tiny_model_dir, tmp_path / "model")
    breakage(d)
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(d)


def test_config_that_does_not_match_the_weights_is_a_short_checkpoint_error(
    tiny_model_dir, tmp_path
):
    d = _copy(tiny_model_dir, tmp_path / "model")
    (d / "config.json").write_text(json.dumps({**_config(d), "hidden_size": 64}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(d)
    assert len(str(info.value)) < 1000 and "config.json" in str(info.value)


# ===================================================================== invalid parameter changes
@pytest.mark.parametrize(
    "name, value, reason",
    [
        ("max_rate_hz", math.nan, "must be in"),
        ("max_rate_hz", math.inf, "must be in"),
        ("max_image_age_s", -math.inf, "must be in"),
        ("max_expressions", 33, "must be in [1, 32]"),
        ("command_queue_size", 1001, "must be in [1, 1000]"),
        ("max_command_chars", 10_001, "must be in [1, 10000]"),
        ("min_object_area", 2**40, "must be in"),
        ("presence_threshold", 1.0, "must be in [0.0, 0.999]"),
        ("presence_threshold", -0.1, "must be in"),
        ("device", "cuda:", "must be auto, cpu, cuda or cuda:N"),
        ("model", "   ", "must be a bundled model name"),
        ("model", "/some/other/model", "applied on configure"),
        ("dtype", "float16", "applied on configure"),
    ],
)
def test_invalid_parameter_change_is_refused_with_a_reason(h, name, value, reason):
    before = h.node.get_parameter(name).value
    (result,) = h.node.set_parameters([Parameter(name, value=value)])
    assert not result.successful
    assert result.reason.startswith(name) and reason in result.reason, result.reason
    assert h.node.get_parameter(name).value == before


def test_an_atomic_change_with_one_invalid_value_changes_nothing(h):
    before = h.node.parameter_values()
    result = h.node.set_parameters_atomically(
        [Parameter("max_expressions", value=2), Parameter("command_queue_size", value=0)])
    assert not result.successful and "command_queue_size" in result.reason
    assert h.node.parameter_values() == before
    h.publish_image()
    answer = h.ask("a mug, a cup and a fork")  # max_expressions is still 5
    assert answer.error == "" and len(answer.targets) == 3
