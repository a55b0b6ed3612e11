"""Answer decoding on top of a prefilled KV cache (GSVA ships none; spec §1.4 and §1.10).

``slots`` (default): constrained slot decoding. The answer skeleton ``Sure, they are e1:·, e2:·.``
is forced; at each slot the next-token logits choose ``[SEG]`` or ``[REJ]`` (score = softmax of
those two logits). One incremental pass: each chunk of forced text is fed once through the
cache, so the prompt is never re-run per slot. The hidden state that predicted the slot is the
mask embedding (position p − 1).

``generate``: greedy free generation until ``</s>``; slots are parsed in order and the hidden
state that produced each ``[SEG]`` is kept, so no extra forward pass is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gsva_ros.model.gsva import GSVAModel


@dataclass
class SlotDecision:
    """One ``[SEG]``/``[REJ]`` slot: the choice, its confidence and the state behind it.

    ``argmax_is_slot`` records GSVA's own evaluator criterion (is the argmax over the whole
    vocabulary this slot token?), which can disagree with the two-way choice; it is logged.
    """

    present: bool
    score: float
    argmax_is_slot: bool
    hidden: torch.Tensor  # H, post-norm last-layer state at the position before the slot


def _step(model: GSVAModel, ids: list[int], cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed ids through the cache → (hidden T×H, logits of the last position V)."""
    t = torch.tensor([ids], device=model.device)
    hidden, _ = model.run_language(model.embed(t, None), past_key_values=cache, use_cache=True)
    hidden = hidden[0]
    return hidden, model.lm_head(hidden[-1]).float()


def _decide(model: GSVAModel, logits: torch.Tensor, hidden: torch.Tensor, choice: int | None):
    seg, rej = model.config.seg_token_id, model.config.rej_token_id
    two = torch.softmax(torch.stack([logits[seg], logits[rej]]), dim=0)
    present = bool(two[0] >= two[1]) if choice is None else choice == seg
    token = seg if present else rej
    return SlotDecision(
        present=present,
        score=float(two[0] if present else two[1]),
        argmax_is_slot=int(logits.argmax()) == token,
        hidden=hidden,
    )


@torch.inference_mode()
def decode_slots(
    model: GSVAModel, ids: list[int], slot_positions: list[int], start: int, cache
) -> list[SlotDecision]:
    """Constrained slot decoding of the skeleton ``ids`` (``[SEG]`` at every slot).

    ``cache`` already holds ``ids[:start]``; it is extended in place (the caller crops it).
    """
    decisions: list[SlotDecision] = []
    pending: list[int] = []  # the slot token chosen last, fed with the next chunk
    pos = start
    for slot in slot_positions:
        hidden, logits = _step(model, pending + ids[pos:slot], cache)
        d = _decide(model, logits, hidden[-1], None)
        decisions.append(d)
        pending = [model.config.seg_token_id if d.present else model.config.rej_token_id]
        pos = slot + 1
    return decisions


@dataclass
class Generation:
    token_ids: list[int]  # generated ids, EOS excluded
    slots: list[SlotDecision]
    finished: bool  # True when EOS was produced before max_new_tokens


@torch.inference_mode()
def generate(
    model: GSVAModel, ids: list[int], start: int, cache, max_new_tokens: int
) -> Generation:
    """Greedy generation after the prompt ``ids`` (``cache`` holds ``ids[:start]``)."""
    cfg = model.config
    hidden, logits = _step(model, ids[start:], cache)
    last_hidden = hidden[-1]
    out: list[int] = []
    slots: list[SlotDecision] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        if token == cfg.eos_token_id:
            return Generation(out, slots, True)
        if token in (cfg.seg_token_id, cfg.rej_token_id):
            slots.append(_decide(model, logits, last_hidden, token))
        out.append(token)
        hidden, logits = _step(model, [token], cache)
        last_hidden = hidden[-1]
    return Generation(out, slots, False)
