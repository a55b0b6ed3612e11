"""Shared pytest configuration and fixtures for the gsva_ros test suite.

Tests are collected with ``--import-mode=importlib`` (see pytest.ini): test folders have no
``__init__.py``, and tests share code through fixtures here, not by importing each other.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# --- environment defaults (for running pytest directly; `make test` sets these explicitly) -----
# Keep DDS traffic on this machine and in a domain of its own, so parallel runs do not meet.
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 100 + 1))
os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")

REPO_ROOT = Path(__file__).resolve().parent.parent


# --- session-wide setup ---------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    """Limit torch to the 2 CPU cores CI has (torch is imported only if installed)."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(2)


# --- paths ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository (and ROS package) root."""
    return REPO_ROOT


# ==============================================================================================
# --- tiny model checkpoint (owned by the ROS node work; keep this block self-contained) --------
# A randomly initialised tiny GSVA saved in the project's checkpoint format, so the engine and
# the ROS node load it exactly like a trained `models/tiny`. It answers arbitrary (but
# deterministic) present/absent decisions: tests using it check behaviour, never accuracy.
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with a random tiny GSVA checkpoint (config.json, model.safetensors, tokenizer)."""
    import torch

    from gsva_ros.model.checkpoint import save_checkpoint
    from gsva_ros.model.config import tiny
    from gsva_ros.model.gsva import GSVAModel
    from gsva_ros.model.tokenizer import build_tiny_tokenizer, token_ids

    corpus = ["the red circle", "all blue squares on the left", "the mug, the spoon and the knife"]
    tokenizer = build_tiny_tokenizer(corpus, vocab_size=300)
    config = tiny(vocab_size=len(tokenizer))
    for key, value in token_ids(tokenizer).items():
        setattr(config, key, value)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)  # same weights in every session; restore the global RNG afterwards
    try:
        model = GSVAModel(config)
    finally:
        torch.random.set_rng_state(state)
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("tiny_model"))
