"""The project's checkpoint format: a directory with ``config.json`` (``GSVAConfig``),
``model.safetensors`` (the ``GSVAModel`` state dict) and the tokenizer files.

Weights are only ever read from safetensors here (never unpickled). Loading builds the model
with empty (meta) parameters first so a 7B model is not initialised randomly before being
overwritten, then assigns the stored tensors; missing or unexpected keys fail loudly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gsva_ros.model.config import GSVAConfig
from gsva_ros.model.gsva import GSVAModel
from gsva_ros.model.tokenizer import check_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A model directory that cannot be loaded; the message says which file and why."""


def save_checkpoint(model: GSVAModel, tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save(out / CONFIG_FILE)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(
        state, str(out / WEIGHTS_FILE), metadata={"format": "gsva_ros", "name": model.config.name}
    )
    tokenizer.save_pretrained(out)
    return out


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        # Never run code shipped in a model directory (and never ask about it on stdin).
        return AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the tokenizer from {model_dir}: {exc}") from exc


def build_model(config: GSVAConfig, state_dict: dict[str, torch.Tensor]) -> GSVAModel:
    """Instantiate ``GSVAModel`` without random init and assign ``state_dict`` (strict)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = GSVAModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not match config.json: {len(missing)} missing "
            f"({', '.join(missing[:5])}…), {len(unexpected)} unexpected "
            f"({', '.join(unexpected[:5])}…)"
        )
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if wrong:  # one short line, not torch's multi-kilobyte report
        raise CheckpointError(
            f"weights do not match config.json: {len(wrong)} tensor shapes differ "
            f"(stored vs config), e.g. {'; '.join(wrong[:3])}"
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def load_checkpoint(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[GSVAModel, object]:
    """Load (model in eval mode on ``device``/``dtype``, tokenizer) from a model directory."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"model directory {d} does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise CheckpointError(f"model directory {d} has no {name}")
    try:
        config = GSVAConfig.load(d / CONFIG_FILE)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    try:
        state = load_file(str(d / WEIGHTS_FILE), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {d / WEIGHTS_FILE}: {exc}") from exc
    tokenizer = load_tokenizer(d)
    try:
        check_tokenizer(tokenizer, config)
    except ValueError as exc:
        raise CheckpointError(f"{d}: {exc}") from exc
    model = build_model(config, state)
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, tokenizer
