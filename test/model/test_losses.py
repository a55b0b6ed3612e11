"""Training losses: GSVA's plain CE mean and the slot-token weighting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gsva_ros.model.config import tiny
from gsva_ros.model.gsva import answer_ce


@pytest.fixture
def cfg():
    c = tiny(vocab_size=12)
    c.seg_token_id, c.rej_token_id = 10, 11
    return c


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, 12, generator=g)
    targets = torch.tensor([[-100, 3, 10, 4, 11, 2], [-100, -100, 5, 10, 2, -100]])
    return logits, targets


def test_weight_one_is_the_plain_token_mean(cfg):
    logits, targets = _batch()
    want = F.cross_entropy(logits.reshape(-1, 12), targets.reshape(-1), ignore_index=-100)
    assert torch.allclose(answer_ce(logits, targets, cfg, 1.0), want)


def test_slot_tokens_weigh_more(cfg):
    logits, targets = _batch(1)
    per = F.cross_entropy(
        logits.reshape(-1, 12), targets.reshape(-1), ignore_index=-100, reduction="none"
    )
    flat = targets.reshape(-1)
    slot = (flat == 10) | (flat == 11)
    plain = (flat != -100) & ~slot
    # 3 slot tokens at weight 4, 5 other answer tokens at weight 1
    want = (4 * per[slot].sum() + per[plain].sum()) / (4 * 3 + 5)
    got = answer_ce(logits, targets, cfg, 4.0)
    assert torch.allclose(got, want)
    assert not torch.allclose(got, answer_ce(logits, targets, cfg, 1.0))


def test_gradient_on_a_slot_logit_scales_with_its_weight(cfg):
    logits, targets = _batch(2)
    grads = []
    for w in (1.0, 5.0):
        x = logits.clone().requires_grad_(True)
        answer_ce(x, targets, cfg, w).backward()
        grads.append(x.grad)
    # position (0, 2) predicts [SEG]; its share of the loss grows from 1/8 to 5/20 of the mean
    ratio = grads[1][0, 2].norm() / grads[0][0, 2].norm()
    assert ratio == pytest.approx((5 / 20) / (1 / 8), rel=1e-5)
