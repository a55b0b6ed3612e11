"""``GSVAConfig``: one dataclass for every GSVA geometry, from the tiny CPU model to GSVA-13B.

Field values for ``gsva-7b`` / ``gsva-13b`` follow ``gsva_reference.md`` §1–§3: LLaVA v1 on
LLaMA (Vicuna-7B v1.1 / LLaMA-2-13B-chat), CLIP ViT-L/14 at 224 px (256 patch tokens from the
penultimate layer, CLS dropped), a single ``Linear`` projector, SAM ViT-H and
``text_hidden_fcs`` = Linear(H,H)–ReLU–Linear(H,256).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# The choices of ``sam_stem`` (built by ``gsva_ros.model.sam_stem``; listed here so that
# reading a config needs no torch).
SAM_STEMS = ("patchify", "conv", "conv-ln")
# The choices of ``vision_stem`` (CLIP's tower; built by ``gsva_ros.model.clip_stem``).
VISION_STEMS = ("patchify", "conv")

# LLaVA's sentinel for "the image goes here"; expanded in place to the 256 CLIP tokens.
IMAGE_TOKEN_INDEX = -200


@dataclass
class GSVAConfig:
    name: str = "custom"

    # LLaMA language model
    vocab_size: int = 32005
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0

    # CLIP vision tower (LLaVA v1: ViT-L/14, 224 px, features of layer -2 without CLS)
    vision_hidden_size: int = 1024
    vision_intermediate_size: int = 4096
    vision_num_hidden_layers: int = 24
    vision_num_attention_heads: int = 16
    vision_image_size: int = 224
    vision_patch_size: int = 14
    vision_projection_dim: int = 768
    vision_feature_layer: int = -2

    # SAM (ViT-H image encoder, prompt encoder, two-way mask decoder)
    sam_image_size: int = 1024
    sam_patch_size: int = 16
    sam_embed_dim: int = 1280
    sam_depth: int = 32
    sam_num_heads: int = 16
    sam_global_attn_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    sam_window_size: int = 14
    sam_prompt_dim: int = 256  # = text_hidden_fcs output (GSVA's out_dim)
    sam_decoder_mlp_dim: int = 2048
    sam_decoder_num_heads: int = 8
    sam_decoder_depth: int = 2
    sam_mask_in_chans: int = 16
    sam_iou_head_hidden_dim: int = 256
    # How pixels become the 1/16 token grid (``sam_stem.STEMS``): SAM's own 16×16 patchify,
    # or a convolutional stem the tiny model can learn shape with (only with 16-px patches).
    sam_stem: str = "patchify"
    # The same choice for CLIP's tower (``clip_stem.STEMS``): CLIP's own patchify projection,
    # or a convolutional stem with the same patch grid (only with even patch sizes).
    vision_stem: str = "patchify"

    # Tokens (7B layout: the LLaVA-7B tokenizer already holds <im_patch>, <im_start>, <im_end>)
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    im_start_token_id: int = 32001
    im_end_token_id: int = 32002
    seg_token_id: int = 32003
    rej_token_id: int = 32004

    # LoRA of the released checkpoints (q_proj/v_proj of LLaMA attention)
    lora_r: int = 8
    lora_alpha: float = 16.0

    # Decoding
    max_new_tokens: int = 128
    # A slot is [SEG] (target present) when softmax over the [SEG]/[REJ] logits gives [SEG] at
    # least this. 0.5 is GSVA's own rule (the larger logit wins); a model trained here may
    # ship a value chosen on held-out data, because its two-way scores are not calibrated.
    presence_threshold: float = 0.5

    @property
    def num_image_tokens(self) -> int:
        return (self.vision_image_size // self.vision_patch_size) ** 2

    @property
    def sam_embedding_size(self) -> int:
        return self.sam_image_size // self.sam_patch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GSVAConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a GSVA config must be a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown GSVA config fields: {', '.join(unknown[:10])}")
        defaults = cls()
        for name, value in data.items():
            expected = type(getattr(defaults, name))
            ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True  # JSON writes 10000.0 as 10000
            if expected is list and ok:
                ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            if not ok:
                raise ValueError(
                    f"GSVA config field {name!r} must be {expected.__name__}, got {value!r:.40}"
                )
        stem = data.get("sam_stem", "patchify")
        if stem not in SAM_STEMS:
            raise ValueError(f"GSVA config field 'sam_stem' must be one of "
                             f"{', '.join(SAM_STEMS)}, got {stem!r:.40}")
        if stem != "patchify" and data.get("sam_patch_size", 16) != 16:
            raise ValueError(f"GSVA config field 'sam_stem' {stem!r} makes 16-px patches; "
                             f"sam_patch_size is {data['sam_patch_size']}")
        vstem = data.get("vision_stem", "patchify")
        if vstem not in VISION_STEMS:
            raise ValueError(f"GSVA config field 'vision_stem' must be one of "
                             f"{', '.join(VISION_STEMS)}, got {vstem!r:.40}")
        if vstem != "patchify" and data.get("vision_patch_size", 14) % 2:
            raise ValueError(f"GSVA config field 'vision_stem' {vstem!r} needs an even "
                             f"vision_patch_size, got {data['vision_patch_size']}")
        threshold = data.get("presence_threshold", 0.5)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"GSVA config field 'presence_threshold' must be in (0, 1), "
                             f"got {threshold!r}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GSVAConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls.from_dict(data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"cannot read GSVA config {path}: {exc}") from exc


def gsva_7b() -> GSVAConfig:
    return GSVAConfig(name="gsva-7b")


def gsva_13b() -> GSVAConfig:
    # LLaMA-2-13B-chat base; its tokenizer has 32000 tokens, so the four added tokens follow.
    return GSVAConfig(
        name="gsva-13b",
        vocab_size=32004,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        seg_token_id=32000,
        rej_token_id=32001,
        im_start_token_id=32002,
        im_end_token_id=32003,
        lora_r=64,
    )


def tiny(vocab_size: int = 1024) -> GSVAConfig:
    """The embedded CPU model: same architecture, sizes small enough to train on 2 cores.

    SAM runs at 384 px (24×24 embedding, 96×96 low-res masks) instead of 1024 px; SAM's and
    CLIP's towers have convolutional stems (``sam_stem``, ``vision_stem``); token ids are
    filled in from the project's own tokenizer when it is built.
    """
    return GSVAConfig(
        name="tiny",
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        vision_hidden_size=96,
        vision_intermediate_size=384,
        vision_num_hidden_layers=3,
        vision_num_attention_heads=4,
        vision_projection_dim=96,
        sam_image_size=384,
        sam_patch_size=16,
        sam_embed_dim=64,
        sam_depth=3,
        sam_num_heads=4,
        sam_global_attn_indexes=[2],
        sam_window_size=8,
        sam_prompt_dim=128,
        sam_decoder_mlp_dim=512,
        sam_decoder_num_heads=4,
        sam_iou_head_hidden_dim=64,
        # SAM's patchify stem hardly learns shape from scratch at this size; this one does.
        sam_stem="conv-ln",
        # The same for CLIP's tower: what lets the language model see which shapes are there.
        vision_stem="conv",
        lora_r=0,
        max_new_tokens=96,
    )


PRESETS = {"tiny": tiny, "gsva-7b": gsva_7b, "gsva-13b": gsva_13b}


def preset(name: str) -> GSVAConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
