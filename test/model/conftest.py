"""Fixtures for model/engine tests: a tiny random GSVA and its tokenizer (built once)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from gsva_ros.model.tokenizer import build_tiny_tokenizer

    corpus = ["the red circle", "all blue squares", "the purple star on the left", "the knife"]
    return build_tiny_tokenizer(corpus, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_config(tiny_tokenizer):
    from gsva_ros.model.config import tiny
    from gsva_ros.model.tokenizer import token_ids

    cfg = tiny(vocab_size=len(tiny_tokenizer))
    for k, v in token_ids(tiny_tokenizer).items():
        setattr(cfg, k, v)
    # smaller than the shipped tiny model so tests stay fast on 2 cores
    cfg.sam_image_size, cfg.sam_depth, cfg.sam_global_attn_indexes = 256, 2, [1]
    cfg.num_hidden_layers, cfg.vision_num_hidden_layers = 2, 2
    return cfg


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    import torch

    from gsva_ros.model.gsva import GSVAModel

    torch.manual_seed(0)
    return GSVAModel(tiny_config).eval()


@pytest.fixture
def rgb_image():
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
