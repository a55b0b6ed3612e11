"""GSVA training (``gsva_reference.md`` §4) for the tiny model and for full-size fine-tuning.

- Samples: one image with up to ``max_slots`` referring expressions drawn from its refs in one
  conversation (optionally, for a share of them, a count drawn from ``min_slots..max_slots``);
  absent targets are ``[REJ]`` slots; draws without any ``[SEG]`` are redrawn (every
  conversation has at least one target, as GSVA).
- Loss: CE on the answer tokens + 2.0·BCE + 0.5·DICE on masks (``GSVAModel.forward_train``).
- Optimiser: AdamW (betas 0.9/0.95, no weight decay), linear warm-up then linear decay to 0,
  gradient clipping 1.0; fp32 or bf16 autocast.
- Full-size models (``lora_r > 0``): LoRA (peft) on the LLaMA q/v projections, and
  ``lm_head``, ``embed_tokens``, the mask decoder and ``text_hidden_fcs`` trained in full, as
  GSVA does; LoRA is merged before saving. The tiny model trains every weight.
- ``accelerate`` drives device placement and mixed precision, so ``accelerate launch gsva-ros
  train …`` scales to several GPUs unchanged.
- For models trained from scratch (``TrainOptions``; all off by default, i.e. GSVA's recipe):
  slot-token CE weight, a single-target curriculum, a held-back mask decoder, a text-only
  warm-up of the language model (:func:`pretrain_language`), the same text objective kept
  as an auxiliary loss during training, and training-only linear read-outs of the phrase (from
  each mask prompt) and of each target's category and mean colour (from SAM's embedding under
  its mask). The README's "The embedded model" says what each did for the tiny model.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gsva_ros.data.grefcoco import group_by_image
from gsva_ros.model.config import GSVAConfig
from gsva_ros.model.gsva import GSVAModel, answer_ce
from gsva_ros.model.preprocess import clip_preprocess, clip_resized_size, sam_preprocess
from gsva_ros.model.prompt import ANSWER_START, encode_conversation


@dataclass
class TrainOptions:
    steps: int = 3000
    batch_size: int = 8
    lr: float = 3e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    max_slots: int = 5
    # 0 = GSVA's draw: every conversation takes max_slots expressions (all the image has when
    # fewer). N >= 1: the count is drawn uniformly from N..max_slots per conversation, so the
    # model also sees the short commands a robot gets.
    min_slots: int = 0
    # With min_slots >= 1: the share of conversations whose count is drawn that way; the rest
    # take GSVA's draw, so short commands are trained without giving up most of the slots (and
    # [REJ] slots) a full conversation carries.
    short_share: float = 1.0
    precision: str = "fp32"  # fp32 | bf16
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    # Loss weights: GSVA's are 1 / 2 / 0.5 and a plain CE mean (slot_weight 1).
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    slot_weight: float = 1.0
    # Curriculum: for the first N steps, conversations leave out multi-target expressions.
    single_first_steps: int = 0
    # For the first N steps SAM's prompt encoder and mask decoder learn at ``decoder_hold_scale``
    # times the learning rate (0 = frozen at their random initialisation).
    decoder_hold_steps: int = 0
    decoder_hold_scale: float = 0.0
    # After that, their learning rate is ``decoder_lr_scale`` times the rest's.
    decoder_lr_scale: float = 1.0
    # Text-only warm-up of a from-scratch language model (see pretrain_language).
    pretrain_lm_steps: int = 0
    pretrain_lm_lr: float = 1e-3
    # The same text objective kept during GSVA training, as an auxiliary loss with this weight
    # on ``aux_lm_rows`` text rows per step (0 = off).
    aux_lm_weight: float = 0.0
    aux_lm_rows: int = 12
    # Phrase objective: a training-only linear head must read the expression's words (multi-hot
    # over the vocabulary, BCE summed over it, mean over slots) from each slot's mask prompt.
    phrase_weight: float = 0.0
    # BCE weight of a mask decoded at [REJ] slots against the empty mask (GSVA: none).
    rej_mask_weight: float = 0.0
    # Category objective: a training-only linear head must name each single target's COCO
    # category (for the synthetic scenes: its shape) from SAM's image embedding pooled over
    # the target's mask (cross-entropy, mean over such slots).
    category_weight: float = 0.0
    # Colour objective: a training-only linear head must give each single target's mean
    # colour (SAM-normalised RGB of the pixels under its mask; MSE) from the same pooled
    # embedding. Needs no labels, so it works on any data.
    colour_weight: float = 0.0
    # The same two read-outs from CLIP's projected patch features (what the language model
    # sees) pooled over the target's mask, each with this weight: the language model can only
    # say [REJ] for an absent shape if CLIP's features carry shape.
    clip_weight: float = 0.0


@dataclass
class ImageRefs:
    """All expressions of one image: sentences with their GT masks (None = no target)."""

    image_path: str
    sentences: list[str]
    samples: list  # RefSample per sentence (mask decoded lazily)


def group_images(samples: list) -> list[ImageRefs]:
    """Images with at least one present target, each sentence once (a conversation never asks
    the same expression twice)."""
    groups = []
    for refs in group_by_image(samples).values():
        g = ImageRefs(str(refs[0].image_path), [], [])
        for s in refs:
            if s.sentence not in g.sentences:
                g.sentences.append(s.sentence)
                g.samples.append(s)
        if any(not s.no_target for s in g.samples):
            groups.append(g)
    return groups


class GRESTrainDataset(torch.utils.data.Dataset):
    """Yields one conversation per image: tokens, labels, preprocessed images, GT masks."""

    def __init__(
        self, images: list[ImageRefs], tokenizer, config: GSVAConfig, max_slots: int, seed: int,
        min_slots: int = 0, short_share: float = 1.0,
    ):
        if not 0 <= min_slots <= max_slots or max_slots < 1:
            raise ValueError(f"need 0 <= min_slots <= max_slots and max_slots >= 1, got "
                             f"{min_slots} and {max_slots}")
        if not 0.0 <= short_share <= 1.0:
            raise ValueError(f"short_share must be in [0, 1], got {short_share}")
        self.images, self.tokenizer, self.config = images, tokenizer, config
        self.max_slots, self.min_slots, self.seed = max_slots, min_slots, seed
        self.short_share = short_share
        self.epoch = 0
        # Set by the training loop during the curriculum phase (see TrainOptions).
        self.single_only = False
        # COCO category id → class index for the category objective (empty = off).
        self.category_index: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int) -> dict:
        g = self.images[idx]
        rng = random.Random(hash((self.seed, self.epoch, idx)) & 0xFFFFFFFF)
        order = list(range(len(g.samples)))
        if self.single_only:
            # "all shapes"-style targets reward a mask that ignores the prompt; without them
            # the decoder has to read the prompt from the start.
            singles = [i for i in order if g.samples[i].case != "multi"]
            if any(g.samples[i].case == "single" for i in singles):
                order = singles
        n_slots = self.max_slots
        # (a share of 1 draws no extra number, so such runs repeat the earlier ones exactly)
        if self.min_slots and (self.short_share >= 1.0 or rng.random() < self.short_share):
            n_slots = rng.randint(min(self.min_slots, len(order)), min(self.max_slots, len(order)))
        while True:  # at least one [SEG] per conversation
            rng.shuffle(order)
            pick = order[:n_slots]
            if any(not g.samples[i].no_target for i in pick):
                break
        image = np.asarray(Image.open(g.image_path).convert("RGB"))
        masks = np.stack([np.asarray(g.samples[i].load_mask(), dtype=bool) for i in pick])
        present = [bool(m.any()) for m in masks]
        conv = encode_conversation(
            self.tokenizer, self.config, [g.samples[i].sentence for i in pick], present
        )
        labels = list(conv.ids)
        labels[: conv.prompt_len] = [-100] * conv.prompt_len
        sam_px, resized = sam_preprocess(image, self.config.sam_image_size)
        return {
            "ids": torch.tensor(conv.ids),
            "labels": torch.tensor(labels),
            "clip": clip_preprocess(image, self.config.vision_image_size),
            "sam": sam_px,
            "resized": resized,
            "masks": torch.from_numpy(masks),
            "picked": pick,  # indices into the image's samples, in slot order
            # each slot's expression as token ids (the phrase objective's targets)
            "phrases": [self.tokenizer(g.samples[i].sentence, add_special_tokens=False)
                        ["input_ids"] for i in pick],
            # each slot's target category as a class index; -1 unless exactly one target
            "categories": torch.tensor([self._category(g.samples[i]) for i in pick]),
            "single": torch.tensor([g.samples[i].case == "single" for i in pick]),
        }

    def _category(self, sample) -> int:
        cats = sample.category_ids
        return self.category_index.get(cats[0], -1) if len(cats) == 1 else -1


def collate(batch: list[dict], pad_id: int) -> dict:
    n = max(len(b["ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["ids"])
        ids[i, :k], labels[i, :k], attn[i, :k] = b["ids"], b["labels"], 1
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "labels": labels,
        "clip_pixels": torch.stack([b["clip"] for b in batch]),
        "sam_pixels": torch.stack([b["sam"] for b in batch]),
        "resized_sizes": [b["resized"] for b in batch],
        "gt_masks": [b["masks"] for b in batch],
        "phrases": [p for b in batch for p in b["phrases"]],  # all slots, batch order
        "categories": [b["categories"] for b in batch],
        "single": [b["single"] for b in batch],
    }


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """Linear warm-up from 0, then linear decay to 0 at ``total`` (GSVA's WarmupDecayLR)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def prepare_trainable(model: GSVAModel) -> GSVAModel | torch.nn.Module:
    """Tiny (lora_r == 0): train everything. Full size: GSVA's LoRA + unfrozen heads."""
    r = model.config.lora_r
    if r <= 0:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(
        r=r,
        lora_alpha=model.config.lora_alpha,
        lora_dropout=0.05,
        bias="none",
        # LLaMA attention only: the names exclude CLIP, projector, SAM and text_hidden_fcs
        target_modules=r"llava\.model\.language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
    )
    wrapped = get_peft_model(model, lora)
    for name, p in wrapped.named_parameters():
        if any(k in name for k in ("lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs")):
            p.requires_grad_(True)
    return wrapped


STOPWORDS = frozenset({"the", "a", "an", "all", "at", "on", "of", "in", "to"})


def summary_text(expressions: list[str], rng: random.Random) -> str:
    """``Sure, they are e1: w w, e2: w w.`` — each expression followed by its content words in
    random order (the pretraining text of :func:`pretrain_language`)."""
    parts = []
    for e in expressions:
        words = [w for w in e.split() if w not in STOPWORDS] or e.split()
        rng.shuffle(words)
        parts.append(f"{e}: {' '.join(words)}")
    return ANSWER_START + ", ".join(parts) + "."


def text_batch(
    images: list[ImageRefs], tokenizer, config: GSVAConfig, rng: random.Random, rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows`` summary texts (:func:`summary_text`) of up to 5 expressions of one image each,
    as (ids, labels, attention mask), every ``[B, L]``; labels are the ids, -100 on padding."""
    seqs = []
    for _ in range(rows):
        g = images[rng.randrange(len(images))]
        k = rng.randint(1, min(5, len(g.sentences)))
        text = summary_text(rng.sample(g.sentences, k), rng)
        seqs.append([config.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"])
    n = max(len(r) for r in seqs)
    ids = torch.full((len(seqs), n), config.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, r in enumerate(seqs):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, 1 : len(r)] = torch.tensor(r[1:])
    mask = (labels != -100).long()
    mask[:, 0] = 1
    return ids, labels, mask


def text_lm_loss(model: GSVAModel, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Causal LM loss of the language model alone (no image) on a :func:`text_batch`."""
    ids, labels, mask = (t.to(model.device) for t in batch)
    hidden, _ = model.run_language(model.embed(ids, None), attention_mask=mask)
    return answer_ce(model.lm_head(hidden[:, :-1]).float(), labels[:, 1:], model.config, 1.0)


def _refuse_lora(model: GSVAModel, what: str) -> None:
    if model.config.lora_r > 0:
        raise ValueError(f"the {what} is for language models trained from scratch, not for "
                         "fine-tuning a pretrained GSVA (lora_r > 0)")


def pretrain_language(
    model: GSVAModel,
    tokenizer,
    images: list[ImageRefs],
    steps: int,
    lr: float,
    batch_size: int = 32,
    seed: int = 0,
) -> list[float]:
    """Text-only warm-up of a language model trained from scratch; returns the loss per step.

    GSVA's mask prompt is the hidden state of the token before ``[SEG]`` (the ``:`` after an
    expression). A pretrained LLaVA already carries the phrase there; a random tiny LLaMA
    carries almost nothing, so the mask decoder learns one mask per image whatever the phrase
    and the two never meet (measured: a linear probe reads the colour word from that state
    barely above chance after 3,000 GSVA steps). Here the model reads ``e: w w`` with the
    expression's content words in random order after the ``:``, so the ``:`` state must hold
    the whole bag of words to predict the first one. Causal LM loss on every token; CLIP, SAM and
    ``text_hidden_fcs`` are untouched.
    """
    from tqdm import tqdm

    _refuse_lora(model, "text warm-up")
    rng = random.Random(seed)
    params = [*model.language_model.parameters(), *model.lm_head.parameters()]
    optim = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: lr_lambda(s, max(1, steps // 10), steps)
    )
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="pretrain text", unit="step", dynamic_ncols=True):
        loss = text_lm_loss(model, text_batch(images, tokenizer, model.config, rng, batch_size))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def phrase_loss(
    head: torch.nn.Linear, prompts: torch.Tensor, phrases: list[list[int]]
) -> torch.Tensor:
    """N×D slot prompts, N token-id lists → mean KL divergence between the uniform distribution
    over each phrase's tokens and ``softmax(head(prompt))`` (0 when the read-out is perfect).

    Why: SAM's decoder only sees this prompt. From scratch, it loses the phrase's words (the
    colour first) long before the decoder learns to use them, and then the decoder never does;
    a linear read-out keeps them there (the head is dropped after training).
    """
    target = torch.zeros(len(phrases), head.out_features, device=prompts.device)
    for i, ids in enumerate(phrases):
        target[i, sorted(set(ids))] = 1.0
    counts = target.sum(1).clamp(min=1)
    target = target / counts[:, None]
    ce = F.cross_entropy(head(prompts.float()), target, reduction="none")
    return (ce - counts.log()).mean()  # minus the target's entropy: KL, floor 0


def category_classes(samples: list) -> dict[int, int]:
    """COCO category id → class index, over the single-target samples (sorted ids)."""
    ids = sorted({s.category_ids[0] for s in samples if len(s.category_ids) == 1})
    return {c: i for i, c in enumerate(ids)}


def pool_under_masks(
    image_embeddings: torch.Tensor,
    sam_pixels: torch.Tensor,
    gt_masks: list[torch.Tensor],
    keep: list[torch.Tensor],
    resized_sizes: list[tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's embedding and the SAM input pixels averaged under each kept slot's mask.

    ``image_embeddings`` B×C×g×g, ``sam_pixels`` B×3×S×S (normalised, padded); per image b,
    ``gt_masks[b]`` n×H×W and ``keep[b]`` n bools. The mask goes through SAM's own geometry
    (resize to the resized size, pad bottom-right to S; averaged to g×g for the embedding).
    Returns N×C pooled embeddings and N×3 mean pixels (N = kept slots, batch order).
    """
    size, g = sam_pixels.shape[-1], image_embeddings.shape[-1]
    pooled, colours = [], []
    for b, k in enumerate(keep):
        if not bool(k.any()):
            continue
        nh, nw = resized_sizes[b]
        m = gt_masks[b][k.to(gt_masks[b].device)].float()[:, None]
        m = F.interpolate(m, size=(nh, nw), mode="area")
        m = F.pad(m, (0, size - nw, 0, size - nh))[:, 0]  # n×S×S
        w = F.adaptive_avg_pool2d(m, g).to(image_embeddings.dtype)  # n×g×g
        emb = torch.einsum("cij,nij->nc", image_embeddings[b], w)
        pooled.append(emb / w.sum((1, 2)).clamp(min=1e-6)[:, None])
        px = torch.einsum("cij,nij->nc", sam_pixels[b].float(), m)
        colours.append(px / m.sum((1, 2)).clamp(min=1e-6)[:, None])
    if not pooled:
        c = image_embeddings.shape[1]
        return image_embeddings.new_zeros((0, c)), sam_pixels.new_zeros((0, 3)).float()
    return torch.cat(pooled), torch.cat(colours)


def pool_clip_under_masks(
    image_features: torch.Tensor,
    gt_masks: list[torch.Tensor],
    keep: list[torch.Tensor],
    image_size: int,
) -> torch.Tensor:
    """CLIP's projected patch features averaged under each kept slot's mask.

    ``image_features`` B×g²×C (row-major patch grid of the ``image_size`` crop); per image b,
    ``gt_masks[b]`` n×H×W and ``keep[b]`` n bools. The mask goes through CLIP's own geometry
    (shortest edge to ``image_size``, centre crop, averaged to g×g); a mask wholly outside the
    crop pools to zero. Returns N×C (N = kept slots, batch order).
    """
    g = math.isqrt(image_features.shape[1])
    pooled = []
    for b, k in enumerate(keep):
        if not bool(k.any()):
            continue
        m = gt_masks[b][k.to(gt_masks[b].device)].float()[:, None]
        nh, nw = clip_resized_size(m.shape[-2], m.shape[-1], image_size)
        m = F.interpolate(m, size=(nh, nw), mode="area")[:, 0]
        top, left = (nh - image_size) // 2, (nw - image_size) // 2
        m = m[:, top : top + image_size, left : left + image_size]
        w = F.adaptive_avg_pool2d(m, g).flatten(1).to(image_features.dtype)  # n×g²
        pooled.append((w @ image_features[b]) / w.sum(1, keepdim=True).clamp(min=1e-6))
    if not pooled:
        return image_features.new_zeros((0, image_features.shape[-1]))
    return torch.cat(pooled)


def category_loss(
    head: torch.nn.Linear, pooled: torch.Tensor, categories: torch.Tensor
) -> torch.Tensor | None:
    """Cross-entropy of ``head`` naming each target's category from its N×C pooled embedding
    (:func:`pool_under_masks`); None without targets.

    Why: the encoders trained by GSVA's loss alone learn colour but hardly shape (a linear
    probe reads colour from the pooled embedding at 0.98, shape at 0.41 against 0.27 chance),
    so the decoder cannot follow shape words; naming the shape of the pixels under each mask
    teaches it directly — with SAM's patchify stem too slowly to matter, with a convolutional
    stem (``sam_stem``) within a training run (README). The head is dropped after training.
    """
    if len(pooled) == 0:
        return None
    return F.cross_entropy(head(pooled.float()), categories.to(pooled.device))


def colour_loss(
    head: torch.nn.Linear, pooled: torch.Tensor, colours: torch.Tensor
) -> torch.Tensor | None:
    """MSE of ``head`` giving each target's N×3 mean pixel from its pooled embedding.

    Why: asked for shape alone, the tiny SAM tower trades colour for it (mask task: colour
    0.82 → 0.55); a colour read-out beside the shape one keeps both (0.86). The mean pixel
    stands in for a colour label, so any data has it. The head is dropped after training.
    """
    if len(pooled) == 0:
        return None
    return F.mse_loss(head(pooled.float()), colours.to(pooled.device))


def read_out_heads(
    cfg: GSVAConfig, opts: TrainOptions, categories: int
) -> dict[str, torch.nn.Linear]:
    """The training-only linear read-outs the options ask for, by name (the name is the loss's
    log key; the train state stores the head as ``<name>_head``)."""
    heads = {}
    if opts.phrase_weight > 0:
        heads["phrase"] = torch.nn.Linear(cfg.sam_prompt_dim, cfg.vocab_size)
    if opts.category_weight > 0:
        heads["category"] = torch.nn.Linear(cfg.sam_prompt_dim, categories)
    if opts.colour_weight > 0:
        heads["colour"] = torch.nn.Linear(cfg.sam_prompt_dim, 3)
    if opts.clip_weight > 0:
        heads["clip_category"] = torch.nn.Linear(cfg.hidden_size, categories)
        heads["clip_colour"] = torch.nn.Linear(cfg.hidden_size, 3)
    return heads


def read_out_weight(opts: TrainOptions, name: str) -> float:
    """The loss weight of read-out ``name`` (see :func:`read_out_heads`)."""
    if name.startswith("clip_"):
        return opts.clip_weight
    return {"phrase": opts.phrase_weight, "category": opts.category_weight,
            "colour": opts.colour_weight}[name]


def read_out_losses(
    heads: dict[str, torch.nn.Linear], res, batch: dict, phrases: list, categories: list,
    single: list, cfg: GSVAConfig,
) -> dict[str, torch.Tensor]:
    """Each head's loss on this batch, by name; a pooled read-out without any single target
    in the batch has none."""
    out = {}
    if "phrase" in heads:
        out["phrase"] = phrase_loss(heads["phrase"], res.slot_prompts, phrases)
    if not any(name != "phrase" for name in heads):
        return out
    # one SAM pooling for every pooled read-out (its mean pixel is the colour target of both
    # towers); a slot with a category is a single target
    sam, mean_px = pool_under_masks(
        res.image_embeddings, batch["sam_pixels"], batch["gt_masks"], single,
        batch["resized_sizes"],
    )
    pooled = {"": sam}
    if "clip_category" in heads:
        pooled["clip_"] = pool_clip_under_masks(
            res.image_features, batch["gt_masks"], single, cfg.vision_image_size
        )
    cats = torch.cat(categories)[torch.cat(single)]
    for prefix, feats in pooled.items():
        if prefix + "category" in heads:
            c = cats.to(feats.device)
            named = c >= 0
            value = category_loss(heads[prefix + "category"], feats[named], c[named])
            if value is not None:
                out[prefix + "category"] = value
        if prefix + "colour" in heads:
            value = colour_loss(heads[prefix + "colour"], feats, mean_px)
            if value is not None:
                out[prefix + "colour"] = value
    return out


def parameter_groups(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """Trainable parameters as [everything else, SAM prompt encoder + mask decoder].

    The second group can be held back early in training (``TrainOptions.decoder_hold_*``):
    a decoder that learns fast while the language model's prompts are still uninformative
    settles on one mask per image whatever the prompt says, and then never reads it.
    """
    rest, decoder = [], []
    parts = ("visual_model.mask_decoder.", "visual_model.prompt_encoder.")
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decoder if any(k in name for k in parts) else rest).append(p)
    return [rest, decoder]


def lr_factors(opts: TrainOptions) -> list:
    """Learning-rate factors per step for the two :func:`parameter_groups`: warm-up and decay
    for both; the decoder group is held at ``decoder_hold_scale`` for the first
    ``decoder_hold_steps``, then runs at ``decoder_lr_scale``."""

    def rest(s: int) -> float:
        return lr_lambda(s, opts.warmup_steps, opts.steps)

    def decoder(s: int) -> float:
        scale = opts.decoder_hold_scale if s < opts.decoder_hold_steps else opts.decoder_lr_scale
        return scale * rest(s)

    return [rest, decoder]


def unwrap_trained(model) -> GSVAModel:
    """Merge LoRA back into the base weights (no-op for the tiny model)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def train(
    model: GSVAModel,
    tokenizer,
    samples: list,
    out_dir: str | Path,
    opts: TrainOptions,
    resume: bool = False,
) -> dict:
    """Train and save to ``out_dir`` (checkpoints under ``out_dir/last``); returns a summary."""
    from accelerate import Accelerator
    from tqdm import tqdm

    from gsva_ros.model.checkpoint import save_checkpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    accelerator = Accelerator(mixed_precision="bf16" if opts.precision == "bf16" else "no")
    images = group_images(samples)
    if not images:
        raise ValueError("training data has no image with a present target")
    dataset = GRESTrainDataset(images, tokenizer, model.config, opts.max_slots, opts.seed,
                               opts.min_slots, opts.short_share)
    if opts.category_weight > 0 or opts.clip_weight > 0:
        dataset.category_index = category_classes(samples)
        if len(dataset.category_index) < 2:
            raise ValueError("the category objective needs single targets of two or more "
                             "categories in the training data")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=opts.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= opts.batch_size,
        num_workers=opts.num_workers,
        collate_fn=lambda b: collate(b, model.config.pad_token_id),
        generator=torch.Generator().manual_seed(opts.seed),
    )
    state_file = out / "last" / "train_state.pt"
    if opts.pretrain_lm_steps > 0 and not (resume and state_file.is_file()):
        pre = pretrain_language(
            model, tokenizer, images, opts.pretrain_lm_steps, opts.pretrain_lm_lr, seed=opts.seed
        )
        (out / "pretrain_log.jsonl").write_text(
            "".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(pre))
        )
    if opts.aux_lm_weight > 0:
        _refuse_lora(model, "auxiliary text loss")
    if opts.phrase_weight > 0:
        _refuse_lora(model, "phrase objective")
    if opts.category_weight > 0:
        _refuse_lora(model, "category objective")
    if opts.colour_weight > 0:
        _refuse_lora(model, "colour objective")
    if opts.clip_weight > 0:
        _refuse_lora(model, "CLIP read-outs")
    aux_rng = random.Random(opts.seed + 1)
    trainable = prepare_trainable(model)
    groups = parameter_groups(trainable)
    heads = read_out_heads(model.config, opts, len(dataset.category_index))
    for h in heads.values():  # training-only: saved in the train state, never with the model
        h.to(model.device)
        groups[0] = [*groups[0], *h.parameters()]
    params = [p for g in groups for p in g]
    optim = torch.optim.AdamW(
        [{"params": g} for g in groups], lr=opts.lr, betas=(0.9, 0.95), weight_decay=0.0
    )
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_factors(opts))
    trainable, optim, loader, sched = accelerator.prepare(trainable, optim, loader, sched)
    step = 0
    if resume and state_file.is_file():
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        accelerator.unwrap_model(trainable).load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        step = int(state["step"])
        for name, h in heads.items():
            if f"{name}_head" in state:
                h.load_state_dict(state[f"{name}_head"])
    log = (out / "loss_log.jsonl").open("a")
    bar = tqdm(total=opts.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    trainable.train()
    t0, running = time.time(), None
    while step < opts.steps:
        dataset.epoch += 1
        dataset.single_only = step < opts.single_first_steps
        for batch in loader:
            if dataset.single_only and step >= opts.single_first_steps:
                break  # curriculum over: start a fresh epoch with every expression
            base = accelerator.unwrap_model(trainable)
            base = base.get_base_model() if hasattr(base, "get_base_model") else base
            phrases = batch.pop("phrases")
            categories = batch.pop("categories")
            single = batch.pop("single")
            with accelerator.autocast():
                res = base.forward_train(
                    **batch,
                    bce_weight=opts.bce_weight,
                    dice_weight=opts.dice_weight,
                    slot_weight=opts.slot_weight,
                    rej_mask_weight=opts.rej_mask_weight,
                )
                loss, aux = res.loss, None
                if opts.aux_lm_weight > 0:
                    # Keeps the phrase at the state before [SEG] (see pretrain_language):
                    # GSVA's loss alone lets it fade once the text warm-up is over.
                    text = text_batch(images, tokenizer, base.config, aux_rng, opts.aux_lm_rows)
                    aux = text_lm_loss(base, text)
                    loss = loss + opts.aux_lm_weight * aux
                extra = read_out_losses(heads, res, batch, phrases, categories, single, base.config)
                for name, value in extra.items():
                    loss = loss + read_out_weight(opts, name) * value
            accelerator.backward(loss)
            if opts.grad_clip > 0:
                accelerator.clip_grad_norm_(params, opts.grad_clip)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            vals = {k: float(getattr(res, k).detach()) for k in ("loss", "ce", "bce", "dice")}
            vals["loss"] = float(loss.detach())
            if aux is not None:
                vals["aux_lm"] = float(aux.detach())
            for name in heads:  # every step (0 without targets): the running average's keys
                vals[name] = float(extra[name].detach()) if name in extra else 0.0
            running = (
                vals
                if running is None
                else {k: 0.95 * running[k] + 0.05 * v for k, v in vals.items()}
            )
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
            if step % opts.log_every == 0 or step == opts.steps:
                rec = {
                    "step": step,
                    "lr": sched.get_last_lr()[0],
                    "time_s": round(time.time() - t0, 1),
                    **vals,
                }
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if step % opts.save_every == 0 or step == opts.steps:
                _save_state(
                    accelerator, trainable, optim, sched, step, tokenizer, out / "last", opts,
                    heads,
                )
            if step >= opts.steps or not math.isfinite(vals["loss"]):
                break
        if not math.isfinite(vals["loss"]):
            raise FloatingPointError(f"loss became {vals['loss']} at step {step}")
    bar.close()
    log.close()
    final = unwrap_trained(accelerator.unwrap_model(trainable))
    final.eval()
    save_checkpoint(final, tokenizer, out)
    return {"steps": step, "final": running, "minutes": (time.time() - t0) / 60, "out": str(out)}


def _save_state(
    accelerator, trainable, optim, sched, step, tokenizer, path: Path, opts, heads=None
) -> None:
    if not accelerator.is_main_process:
        return
    path.mkdir(parents=True, exist_ok=True)
    model = accelerator.unwrap_model(trainable)
    if hasattr(model, "get_base_model"):  # LoRA: the merged model is written at the end
        model.get_base_model().config.save(path / "config.json")
        tokenizer.save_pretrained(path)
    else:  # a loadable snapshot, so an interrupted run can still be evaluated
        from gsva_ros.model.checkpoint import save_checkpoint

        save_checkpoint(model, tokenizer, path)
    state = {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "sched": sched.state_dict(),
        "step": step,
    }
    for name, h in (heads or {}).items():
        state[f"{name}_head"] = h.state_dict()
    tmp = path / "train_state.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(path / "train_state.pt")
    (path / "options.json").write_text(json.dumps(asdict(opts), indent=2))
