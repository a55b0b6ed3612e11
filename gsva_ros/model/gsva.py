"""``GSVAModel``: LLaVA (transformers) + SAM (segment_anything) + ``text_hidden_fcs``.

Module names mirror the official checkpoint where they can (``visual_model`` is a
``segment_anything`` ``Sam``, ``text_hidden_fcs`` is a one-element ``ModuleList``), so the
converter maps keys by prefix only. Differences to transformers' LLaVA that GSVA needs:

- LLaVA v1 projects CLIP features with one ``Linear(1024 → H)``; transformers' projector is
  Linear–GELU–Linear, so it is replaced by :class:`LinearProjector`.
- Image features come from CLIP layer ``vision_feature_layer`` (−2) with CLS dropped (256
  tokens); they are written into the sequence at the ``IMAGE_TOKEN_INDEX`` sentinels, which is
  what LLaVA's ``prepare_inputs_labels_for_multimodal`` does.
- The mask embedding of a ``[SEG]`` at position p is the post-norm last-layer hidden state at
  p − 1 (the state that predicts ``[SEG]``), projected by ``text_hidden_fcs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.image_encoder import Attention as SamAttention
from segment_anything.modeling.image_encoder import get_rel_pos
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from gsva_ros.model.clip_stem import set_stem as set_clip_stem
from gsva_ros.model.config import IMAGE_TOKEN_INDEX, GSVAConfig
from gsva_ros.model.preprocess import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from gsva_ros.model.sam_stem import set_stem


class LinearProjector(nn.Module):
    """LLaVA v1's ``mm_projector``: a single Linear from CLIP width to the LLM width."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(image_features)


def build_llava(cfg: GSVAConfig) -> LlavaForConditionalGeneration:
    text = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_intermediate_size,
        num_hidden_layers=cfg.vision_num_hidden_layers,
        num_attention_heads=cfg.vision_num_attention_heads,
        image_size=cfg.vision_image_size,
        patch_size=cfg.vision_patch_size,
        projection_dim=cfg.vision_projection_dim,
        hidden_act="quick_gelu",
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=cfg.pad_token_id,  # unused: images enter through the -200 sentinel
        image_seq_length=cfg.num_image_tokens,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = "sdpa"
    llava = LlavaForConditionalGeneration(config)
    llava.model.multi_modal_projector = LinearProjector(cfg.vision_hidden_size, cfg.hidden_size)
    # (transformers 4 nests the embeddings under .vision_model, 5 does not)
    tower = llava.model.vision_tower
    set_clip_stem(next(m for m in tower.modules() if hasattr(m, "patch_embedding")),
                  cfg.vision_stem)
    return llava


def build_sam(cfg: GSVAConfig) -> Sam:
    emb = cfg.sam_embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=cfg.sam_image_size,
            patch_size=cfg.sam_patch_size,
            embed_dim=cfg.sam_embed_dim,
            depth=cfg.sam_depth,
            num_heads=cfg.sam_num_heads,
            mlp_ratio=4,
            out_chans=cfg.sam_prompt_dim,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=cfg.sam_window_size,
            global_attn_indexes=tuple(cfg.sam_global_attn_indexes),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.sam_prompt_dim,
            image_embedding_size=(emb, emb),
            input_image_size=(cfg.sam_image_size, cfg.sam_image_size),
            mask_in_chans=cfg.sam_mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=cfg.sam_decoder_depth,
                embedding_dim=cfg.sam_prompt_dim,
                mlp_dim=cfg.sam_decoder_mlp_dim,
                num_heads=cfg.sam_decoder_num_heads,
            ),
            transformer_dim=cfg.sam_prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=cfg.sam_iou_head_hidden_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    set_stem(sam.image_encoder, cfg.sam_stem, cfg.sam_embed_dim)
    return sam


@dataclass
class TrainOutput:
    loss: torch.Tensor
    ce: torch.Tensor
    bce: torch.Tensor
    dice: torch.Tensor
    # The mask prompt (text_hidden_fcs output) at every [SEG]/[REJ] slot, N_slots×D in batch
    # and slot order (with gradient): training-only objectives can read it.
    slot_prompts: torch.Tensor | None = None
    # SAM's image embedding, B×C×g×g (with gradient), for training-only image objectives.
    image_embeddings: torch.Tensor | None = None
    # CLIP's projected patch features, B×g²×H (with gradient): what the language model sees.
    image_features: torch.Tensor | None = None


def answer_ce(
    logits: torch.Tensor, targets: torch.Tensor, cfg: GSVAConfig, slot_weight: float
) -> torch.Tensor:
    """B×T×V logits, B×T targets (−100 = ignored) → weighted mean CE.

    Only one answer token in ~15 decides [SEG] vs [REJ]; with ``slot_weight`` > 1 that decision
    (the only place rejection is learned) is not drowned by the easy copied-expression tokens.
    """
    flat_t = targets.reshape(-1)
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), flat_t, ignore_index=-100, reduction="none"
    )
    weight = (flat_t != -100).float()
    if slot_weight != 1.0:
        is_slot = (flat_t == cfg.seg_token_id) | (flat_t == cfg.rej_token_id)
        weight = weight * torch.where(is_slot, slot_weight, 1.0)
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0)


class GSVAModel(nn.Module):
    def __init__(self, config: GSVAConfig) -> None:
        super().__init__()
        self.config = config
        self.llava = build_llava(config)
        self.visual_model = build_sam(config)
        h, out = config.hidden_size, config.sam_prompt_dim
        self.text_hidden_fcs = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Linear(h, h), nn.ReLU(inplace=True), nn.Linear(h, out), nn.Dropout(0.0)
                )
            ]
        )

    # ------------------------------------------------------------------ parts
    @property
    def language_model(self) -> nn.Module:
        return self.llava.model.language_model

    @property
    def lm_head(self) -> nn.Linear:
        return self.llava.lm_head

    def encode_clip(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        """B×3×224×224 → B×256×H projected CLIP patch features (layer −2, CLS dropped)."""
        vision = self.llava.model.vision_tower
        out = vision(clip_pixels.to(self.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.config.vision_feature_layer][:, 1:]
        return self.llava.model.multi_modal_projector(feats)

    def encode_sam(self, sam_pixels: torch.Tensor) -> torch.Tensor:
        """B×3×S×S (normalized, padded) → B×C×S/16×S/16 SAM image embedding."""
        return self.visual_model.image_encoder(sam_pixels.to(self.dtype))

    def embed(self, ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """B×T ids with ``IMAGE_TOKEN_INDEX`` sentinels → B×T×H embeddings with image features.

        ``image_features`` is B×256×H; row b fills the sentinels of row b in order.
        """
        emb = self.language_model.embed_tokens(ids.clamp(min=0))
        is_image = ids == IMAGE_TOKEN_INDEX
        if image_features is None:
            if bool(is_image.any()):
                raise ValueError("sequence has image positions but no image features")
            return emb
        n_img = is_image.sum(dim=1)
        if not bool((n_img == image_features.shape[1]).all()):
            raise ValueError(
                f"expected {image_features.shape[1]} image positions per row, got {n_img.tolist()}"
            )
        return emb.masked_scatter(is_image.unsqueeze(-1), image_features.to(emb.dtype))

    def run_language(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
    ):
        """Run LLaMA; returns (post-norm last hidden states B×T×H, cache)."""
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values

    def project_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """n×H hidden states → n×C SAM prompt embeddings."""
        return self.text_hidden_fcs[0](hidden)

    def decode_masks(self, image_embedding: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """One image's embedding 1×C×h×w and n prompts n×C → low-res mask logits n×1×4h×4w.

        Each prompt is one sparse token; the dense prompt is SAM's learned no-mask embedding;
        ``multimask_output=False`` keeps mask token 0 (§1.7).
        """
        pe_layer = self.visual_model.prompt_encoder
        n = prompts.shape[0]
        h, w = image_embedding.shape[-2:]
        sparse = prompts.to(image_embedding.dtype).unsqueeze(1)
        dense = pe_layer.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
        low_res, _ = self.visual_model.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=pe_layer.get_dense_pe().to(image_embedding.dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(image_embedding.dtype),
            multimask_output=False,
        )
        return low_res

    def postprocess_masks(
        self, low_res: torch.Tensor, resized: tuple[int, int], original: tuple[int, int]
    ) -> torch.Tensor:
        """n×1×h×w logits → n×H×W float32 logits at the source size (``Sam.postprocess_masks``)."""
        s = self.config.sam_image_size
        masks = F.interpolate(low_res.float(), (s, s), mode="bilinear", align_corners=False)
        masks = masks[..., : resized[0], : resized[1]]
        masks = F.interpolate(masks, original, mode="bilinear", align_corners=False)
        return masks[:, 0]

    @property
    def dtype(self) -> torch.dtype:
        return self.text_hidden_fcs[0][0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_hidden_fcs[0][0].weight.device

    # ------------------------------------------------------------------ training
    def forward_train(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        clip_pixels: torch.Tensor,
        sam_pixels: torch.Tensor,
        resized_sizes: list[tuple[int, int]],
        gt_masks: list[torch.Tensor],
        ce_weight: float = 1.0,
        bce_weight: float = 2.0,
        dice_weight: float = 0.5,
        slot_weight: float = 1.0,
        rej_mask_weight: float = 0.0,
    ) -> TrainOutput:
        """Teacher-forced GSVA loss (§4): CE on answer tokens + 2·BCE + 0.5·DICE on masks.

        ``gt_masks[b]`` is n_slots_b×H_b×W_b (float 0/1) in slot order; ``[REJ]`` slots are
        all-zero, produce no prediction and only count in the mask-loss normaliser, as GSVA.
        ``slot_weight`` scales the CE of the ``[SEG]``/``[REJ]`` answer tokens (1.0 = GSVA's
        plain token mean); the CE stays a weighted mean over answer tokens.
        ``rej_mask_weight`` > 0 also decodes a mask at each ``[REJ]`` slot and adds that
        weight times its BCE against the empty mask (GSVA: 0, no mask for absent targets).
        """
        from gsva_ros.model.losses import dice_loss, sigmoid_bce_loss

        image_features = self.encode_clip(clip_pixels)
        embeds = self.embed(input_ids, image_features)
        hidden, _ = self.run_language(embeds, attention_mask=attention_mask)
        logits = self.lm_head(hidden[:, :-1]).float()
        ce = answer_ce(logits, labels[:, 1:], self.config, slot_weight)

        image_embeddings = self.encode_sam(sam_pixels)
        seg_next = input_ids[:, 1:] == self.config.seg_token_id
        slot_next = seg_next | (input_ids[:, 1:] == self.config.rej_token_id)
        bce = hidden.new_zeros((), dtype=torch.float32)
        dice = hidden.new_zeros((), dtype=torch.float32)
        n_slots = 0
        all_prompts = []
        for b in range(input_ids.shape[0]):
            is_seg = seg_next[b][slot_next[b]]  # slot order → SEG?
            n_slots += int(is_seg.numel())
            slot_prompts = self.project_hidden(hidden[b, :-1][slot_next[b]])  # row-wise MLP
            all_prompts.append(slot_prompts)
            with_rej = rej_mask_weight > 0 and not bool(is_seg.all())
            if not bool(is_seg.any()) and not with_rej:
                continue
            decode = torch.ones_like(is_seg) if with_rej else is_seg
            low_res = self.decode_masks(image_embeddings[b : b + 1], slot_prompts[decode])
            target = gt_masks[b][decode].float()
            pred = self.postprocess_masks(low_res, resized_sizes[b], tuple(target.shape[-2:]))
            seg = is_seg[decode]
            bce = bce + sigmoid_bce_loss(pred[seg], target[seg]).sum()
            dice = dice + dice_loss(pred[seg], target[seg]).sum()
            if with_rej:  # absent targets: the decoder should find nothing
                bce = bce + rej_mask_weight * sigmoid_bce_loss(pred[~seg], target[~seg]).sum()
        n_slots = max(n_slots, 1)
        bce, dice = bce / n_slots, dice / n_slots
        loss = ce_weight * ce + bce_weight * bce + dice_weight * dice
        return TrainOutput(
            loss=loss, ce=ce.detach(), bce=bce.detach(), dice=dice.detach(),
            slot_prompts=torch.cat(all_prompts), image_embeddings=image_embeddings,
            image_features=image_features,
        )

    # ------------------------------------------------------------------ inference options
    def set_sam_attention(self, mode: str) -> None:
        """Choose how SAM's image encoder computes attention (weights are untouched).

        ``"reference"``: segment_anything's own ``Attention.forward`` (rebuilds its relative
        position index on the host at every call, so it cannot be captured in a CUDA graph).
        ``"matmul"``: the same arithmetic in the same order (bit-identical on CPU), with the
        relative-position index cached on the device: capture-safe. ``"sdpa"``: the relative
        position bias is passed to ``F.scaled_dot_product_attention`` as an additive mask; equal
        up to floating-point reassociation, and the fused kernel never materialises the softmax
        input separately (the global blocks' 16×4096×4096 scores dominate SAM's memory).
        """
        if mode not in SAM_ATTENTION_MODES:
            raise ValueError(f"SAM attention must be one of {SAM_ATTENTION_MODES}, got {mode!r}")
        for block in self.visual_model.image_encoder.blocks:
            attn = block.attn
            if mode == "reference":
                attn.__class__ = SamAttention
            else:
                attn.__class__ = FastSamAttention
                attn.use_sdpa = mode == "sdpa"

    @property
    def sam_attention(self) -> str:
        attn = self.visual_model.image_encoder.blocks[0].attn
        if isinstance(attn, FastSamAttention):
            return "sdpa" if attn.use_sdpa else "matmul"
        return "reference"

    def quantize_language(self, mode: str) -> int:
        """Replace the LLaMA decoder's Linear layers by bitsandbytes int8 / NF4 ones.

        Kept in the model dtype on purpose (``performance.md`` §4.7): embeddings, ``lm_head``
        (decides [SEG]/[REJ]), the final norm, ``text_hidden_fcs`` (the mask prompt), CLIP,
        the projector and SAM. Returns the number of replaced layers. Raises
        :class:`QuantizationError` with an actionable message when bitsandbytes is missing.
        """
        return quantize_language_model(self, mode)


SAM_ATTENTION_MODES = ("reference", "matmul", "sdpa")
QUANTIZE_MODES = ("none", "int8", "nf4")


class FastSamAttention(SamAttention):
    """segment_anything's windowed/global attention with decomposed relative positions.

    Same parameters and state dict as ``segment_anything``'s ``Attention`` (instances are
    switched by assigning ``__class__``, see :meth:`GSVAModel.set_sam_attention`). Differences:
    the relative-position gather index is computed once per (q_h, q_w, device) and kept on the
    device, so the forward has no host→device copy and can be captured in a CUDA graph; and
    ``use_sdpa`` selects ``F.scaled_dot_product_attention`` with the relative-position bias
    as an additive mask.
    """

    use_sdpa: bool = False

    def _rel_index(self, size: int, device: torch.device) -> torch.Tensor:
        """size×size long index into ``rel_pos_*`` (q_size == k_size, as everywhere in SAM)."""
        cache = self.__dict__.setdefault("_rel_index_cache", {})
        key = (size, str(device))
        if key not in cache:
            coords = torch.arange(size, device=device)
            cache[key] = coords[:, None] - coords[None, :] + (size - 1)
        return cache[key]

    def _rel_terms(self, q: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B·nh)×(h·w)×C → rel_h (B·nh)×h×w×h and rel_w (B·nh)×h×w×w (SAM's decomposition)."""
        if self.rel_pos_h.shape[0] == 2 * h - 1 and self.rel_pos_w.shape[0] == 2 * w - 1:
            rh = self.rel_pos_h[self._rel_index(h, q.device)]  # h×h×C
            rw = self.rel_pos_w[self._rel_index(w, q.device)]  # w×w×C
        else:  # another input size: SAM interpolates the table (host-built index, not capturable)
            rh = get_rel_pos(h, h, self.rel_pos_h)
            rw = get_rel_pos(w, w, self.rel_pos_w)
        r_q = q.reshape(q.shape[0], h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
        return rel_h, rel_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x B×h×w×dim → B×h×w×dim."""
        b, h, w, _ = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, n, -1).unbind(0)  # (B·nh)×n×C each
        if self.use_sdpa:
            mask = None
            if self.use_rel_pos:
                rel_h, rel_w = self._rel_terms(q, h, w)
                mask = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(-1, n, n)
            out = F.scaled_dot_product_attention(
                q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                attn_mask=None if mask is None else mask.unsqueeze(0),
                scale=self.scale,
            )[0]
        else:
            # Same operations in the same order as segment_anything (bit-identical).
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if self.use_rel_pos:
                rel_h, rel_w = self._rel_terms(q, h, w)
                attn = (
                    attn.view(-1, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
                ).view(-1, n, n)
            out = attn.softmax(dim=-1) @ v
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


class QuantizationError(RuntimeError):
    """``quantize`` was requested but cannot be honoured (message says what to install)."""


_LLAMA_LINEARS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)


def quantize_language_model(model: GSVAModel, mode: str) -> int:
    """See :meth:`GSVAModel.quantize_language`. Quantises on the model's current device."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if mode == "none":
        return 0
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # also raised for a broken install (missing CUDA libs)
        raise QuantizationError(
            f"quantize={mode} needs bitsandbytes, which cannot be imported ({exc}); install it "
            f"with `pip install bitsandbytes==0.50.2` (a CUDA GPU is needed for useful speed), "
            f"or use quantize=none"
        ) from exc
    device, dtype = model.device, model.dtype
    replaced = 0
    for layer in model.language_model.layers:
        for parent_name, name in _LLAMA_LINEARS:
            parent = getattr(layer, parent_name)
            lin: nn.Linear = getattr(parent, name)
            has_bias = lin.bias is not None
            if mode == "int8":
                q = bnb.nn.Linear8bitLt(
                    lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                    threshold=6.0, device="meta",
                )
                param = bnb.nn.Int8Params(lin.weight.data, requires_grad=False,
                                          has_fp16_weights=False)
                # Int8Params quantises only when moved off the CPU; _quantize works in place on
                # any device, so 7B weights already on the GPU need no round trip to the host.
                q.weight = param._quantize(device)
            else:
                q = bnb.nn.Linear4bit(
                    lin.in_features, lin.out_features, bias=has_bias, compute_dtype=dtype,
                    quant_type="nf4", device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    lin.weight.data, requires_grad=False, quant_type="nf4"
                ).to(device)
            if has_bias:
                q.bias = nn.Parameter(lin.bias.data.to(dtype), requires_grad=False)
            setattr(parent, name, q)
            replaced += 1
    return replaced
