"""The plain way of running GSVA: transformers' LLaVA ``generate`` + segment_anything's SAM.

This is the baseline of ``docs/performance.md`` (the project's anchor measurement), measured
again inside ``gsva-ros bench gpu`` so that baseline and engine share one run, one GPU and one
set of library versions. What it measures, with random weights (the cost of the arithmetic,
not of any answer):

- ``sam_encoder_ms``: SAM ViT-H image encoder on one 1024² input (eager, bf16);
- ``clip_tower_ms``: LLaVA's image features (CLIP ViT-L/14 + projector);
- ``prefill_ms``: one LLaVA forward over BOS + 256 image tokens + 60 text tokens (CLIP
  included, as ``LlavaForConditionalGeneration`` runs it);
- ``generate20_ms``: ``generate`` of exactly 20 tokens (``min_new_tokens``) with hidden
  states returned, as GSVA needs them; ``decode_ms_per_token`` = (generate − prefill) / 19;
- ``prefix_cached_text_prefill_ms``: the text after a cached image prefix (the cache is
  deep-copied per call, the plain way of reusing it);
- ``mask_decoder_1_ms`` / ``_3_seq_ms`` / ``_3_batched_ms``: SAM's mask decoder for one
  prompt, three prompts one after another, three prompts in one call;
- ``plain_command_ms`` = SAM + generate20 + 3 sequential decoder calls (one command, fresh
  frame); ``cached_second_command_ms`` = cached text prefill + 19 tokens + one decoder call.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from gsva_ros.bench.common import summarize, time_device

NEW_TOKENS = 20
TEXT_TOKENS = 60


def _geometry(name: str):
    from gsva_ros.model.config import gsva_7b, gsva_13b

    if name == "7b":
        return gsva_7b()
    if name == "13b":
        return gsva_13b()
    if name == "tiny":  # CPU smoke tests of the benchmark code itself
        from gsva_ros.model.config import tiny

        cfg = tiny(vocab_size=512)
        cfg.sam_image_size, cfg.sam_depth, cfg.sam_global_attn_indexes = 256, 2, [1]
        cfg.num_hidden_layers, cfg.vision_num_hidden_layers = 2, 2
        return cfg
    raise ValueError(f"geometry must be 7b, 13b or tiny, got {name!r}")


def measure_plain(geometry: str, device: str, reps: int = 10, warm: int = 3) -> dict[str, Any]:
    """Run the plain pipeline's measurements → flat dict of medians (ms) and sizes."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    cfg = _geometry(geometry)
    dev = torch.device(device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    image_token = 32000 if cfg.vocab_size > 32000 else cfg.vocab_size - 1
    text = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size, intermediate_size=cfg.vision_intermediate_size,
        num_hidden_layers=cfg.vision_num_hidden_layers,
        num_attention_heads=cfg.vision_num_attention_heads, image_size=cfg.vision_image_size,
        patch_size=cfg.vision_patch_size, projection_dim=cfg.vision_projection_dim,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    res: dict[str, Any] = {"geometry": geometry}
    torch.manual_seed(0)
    t = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dt)  # initialise directly in bf16 on the GPU: seconds, not minutes
    try:
        with torch.device(dev):
            llava = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    res["build_llava_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    if geometry in ("7b", "13b"):
        from segment_anything import sam_model_registry

        sam = sam_model_registry["vit_h"]()
    else:
        from gsva_ros.model.gsva import build_sam

        sam = build_sam(cfg)
    sam = sam.to(dev, dt).eval()
    res["build_sam_s"] = round(time.perf_counter() - t, 1)

    n_img = cfg.num_image_tokens
    ids = torch.cat([
        torch.tensor([1]),
        torch.full((n_img,), image_token),
        torch.randint(100, min(31000, image_token), (TEXT_TOKENS,)),
    ])[None].to(dev)
    res["prompt_tokens"] = int(ids.shape[1])
    px = torch.randn(1, 3, cfg.vision_image_size, cfg.vision_image_size, device=dev, dtype=dt)
    s = cfg.sam_image_size
    sam_in = torch.randn(1, 3, s, s, device=dev, dtype=dt)

    def med(fn, n=reps) -> float:
        return summarize(time_device(fn, n, warm))["p50"]

    with torch.inference_mode():
        res["sam_encoder_ms"] = med(lambda: sam.image_encoder(sam_in))
        res["clip_tower_ms"] = med(lambda: llava.model.get_image_features(pixel_values=px))
        res["prefill_ms"] = med(lambda: llava(input_ids=ids, pixel_values=px, use_cache=True))

        def gen():
            return llava.generate(
                input_ids=ids, pixel_values=px, max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS, do_sample=False, output_hidden_states=True,
                return_dict_in_generate=True,
            )

        res["generate20_ms"] = med(gen, max(3, reps // 2))
        res["decode_ms_per_token"] = (res["generate20_ms"] - res["prefill_ms"]) / (NEW_TOKENS - 1)

        # Second command on the same frame: image prefix cached, only the new text prefilled.
        split = 1 + n_img + 20
        pkv = llava(input_ids=ids[:, :split], pixel_values=px, use_cache=True).past_key_values
        tail = ids[:, split:]

        def cached_prefill():
            llava(input_ids=tail, past_key_values=copy.deepcopy(pkv), use_cache=True)

        res["prefix_cached_text_prefill_ms"] = med(cached_prefill)

        emb = sam.image_encoder(sam_in)
        sam.prompt_encoder.float()  # its random Fourier features need float32 coordinates
        pe = sam.prompt_encoder.get_dense_pe().to(dt)
        sp0, de0 = (x.to(dt) for x in sam.prompt_encoder(points=None, boxes=None, masks=None))
        dim = sp0.shape[-1] if sp0.numel() else cfg.sam_prompt_dim

        def decoder(k: int):
            tok = torch.randn(k, 1, dim, device=dev, dtype=dt)
            sp = torch.cat([sp0.expand(k, -1, -1), tok], 1)
            return sam.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sp,
                                    dense_prompt_embeddings=de0, multimask_output=False)

        def three_sequential():
            for _ in range(3):
                decoder(1)

        res["mask_decoder_1_ms"] = med(lambda: decoder(1))
        res["mask_decoder_3_seq_ms"] = med(three_sequential)
        try:
            res["mask_decoder_3_batched_ms"] = med(lambda: decoder(3))
        except Exception as exc:  # noqa: BLE001 - stock decoder versions differ here
            res["mask_decoder_3_batched_ms"] = f"error: {type(exc).__name__}: {exc}"[:200]
    if dev.type == "cuda":
        res["max_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    res["plain_command_ms"] = (
        res["sam_encoder_ms"] + res["generate20_ms"] + res["mask_decoder_3_seq_ms"]
    )
    res["cached_second_command_ms"] = (
        res["prefix_cached_text_prefill_ms"]
        + (NEW_TOKENS - 1) * res["decode_ms_per_token"]
        + res["mask_decoder_1_ms"]
    )
    # The models are freed when this frame returns (the caller empties the CUDA cache).
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}
