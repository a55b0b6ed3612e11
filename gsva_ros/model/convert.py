"""Convert a released GSVA checkpoint (``gsva-7b-*.bin`` / ``gsva-llama2-13b-*.bin``) into the
project's own format (``config.json`` + ``model.safetensors`` + tokenizer, see
:mod:`gsva_ros.model.checkpoint`).

Official layout (``gsva_reference.md`` §3.2), after stripping the PEFT prefix
``base_model.model.`` — official name → our ``GSVAModel`` name:

- ``model.embed_tokens.weight`` [V×H], ``model.layers.{i}.*``, ``model.norm.weight`` →
  ``llava.model.language_model.*``; ``lm_head.weight`` [V×H] → ``llava.lm_head.weight``.
- ``model.layers.{i}.self_attn.{q,v}_proj.lora_{A,B}.default.weight`` (A: [r×in], B: [out×r]);
  the base weight is ``….q_proj.weight`` (peft 0.4) or ``….q_proj.base_layer.weight``
  (peft ≥ 0.7). Merged as ``W + (B @ A) · α / r``.
- ``model.mm_projector.{weight [H×1024], bias [H]}`` →
  ``llava.model.multi_modal_projector.linear.*``.
- ``model.vision_tower.vision_tower.vision_model.*`` (HF ``CLIPVisionModel`` inside LLaVA's
  tower wrapper) → our CLIP tower (:func:`vision_prefix`).
- ``model.visual_model.{image_encoder,prompt_encoder,mask_decoder}.*`` → ``visual_model.*``.
- ``model.text_hidden_fcs.0.{0,2}.{weight,bias}`` → ``text_hidden_fcs.0.{0,2}.*``.

Keys the ``.bin`` lacks are filled from the base artifacts, and only from the one each part
belongs to: LLaMA from the LLaVA folder (``model.layers…``, ``lm_head…``; its ``mm_projector``
is ignored on purpose — GSVA re-creates the projector and trains against its own copy), CLIP
from ``clip_dir`` (HF ``vision_model.*``) or else the LLaVA folder, SAM from
``sam_vit_h_4b8939.pth`` (``image_encoder.*`` …). The projector and ``text_hidden_fcs`` have
no fallback. Every key of every source is either used, shadowed by the ``.bin``, or in an
explicitly ignored family; anything else, any missing key and any shape mismatch fails the
conversion with the key names (the official loader's ``strict=False`` would hide them).

Pickles are only ever opened with ``torch.load(weights_only=True)``: a file carrying objects
other than tensors is refused and its payload never runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gsva_ros.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from gsva_ros.model.config import PRESETS, GSVAConfig, preset
from gsva_ros.model.prompt import IM_END, IM_START, REJ, SEG
from gsva_ros.model.tokenizer import add_gsva_tokens, token_ids

PEFT_PREFIX = "base_model.model."
LM = "llava.model.language_model."
LM_HEAD = "llava.lm_head."
PROJECTOR = "llava.model.multi_modal_projector.linear."
SAM = "visual_model."
FCS = "text_hidden_fcs."

GSVA_BIN, LLAVA, CLIP, SAM_CKPT = "gsva_bin", "llava", "clip", "sam"

# Token ids of the released models (§3.3): the 7B LLaVA tokenizer already holds <im_patch>,
# <im_start>, <im_end> (32000–32002), the 13B LLaMA-2 one has 32000 plain tokens.
GEOMETRY_TOKEN_IDS: dict[str, dict[str, int]] = {
    "gsva-7b": {
        "im_start_token_id": 32001,
        "im_end_token_id": 32002,
        "seg_token_id": 32003,
        "rej_token_id": 32004,
    },
    "gsva-13b": {
        "seg_token_id": 32000,
        "rej_token_id": 32001,
        "im_start_token_id": 32002,
        "im_end_token_id": 32003,
    },
}
# LoRA rank of the releases (scripts/eval_demo.sh); alpha is 16 for both (13B: assumed).
DEFAULT_LORA_R: dict[str, int] = {"gsva-7b": 8, "gsva-13b": 64}
DEFAULT_LORA_ALPHA = 16

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}


class ConversionError(RuntimeError):
    """The inputs cannot be converted; the (single-line) message names files and keys."""


# ---------------------------------------------------------------------------- report
@dataclass
class ConversionReport:
    """What :func:`convert_official` wrote and where every tensor came from."""

    out_dir: Path
    geometry: str
    dtype: str
    sources: dict[str, str]  # label → path
    keys_from: dict[str, int]  # label → number of output tensors taken from it
    shadowed: dict[str, int]  # fill label → keys it had that the .bin provided instead
    ignored: list[str]  # "label:key" of explicitly ignored keys
    source_dtypes: dict[str, list[str]]
    lora_merged: list[str]  # our names of the weights that received W + B·A·α/r
    lora_r: int
    lora_alpha: float
    token_ids: dict[str, int]
    vocab_size: int
    num_tensors: int
    num_params: int
    num_bytes: int
    config_overrides: dict[str, tuple] = field(default_factory=dict)  # field → (preset, ours)

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_r if self.lora_r else 0.0

    def rows(self) -> list[tuple[str, str]]:
        rows = [
            ("output", str(self.out_dir)),
            ("geometry", self.geometry),
            ("dtype", f"{self.dtype} (sources: {self._source_dtypes()})"),
            ("tensors", str(self.num_tensors)),
            ("parameters", f"{self.num_params / 1e6:.2f} M"),
            ("size", f"{self.num_bytes / 2**20:.1f} MiB"),
        ]
        for label, n in self.keys_from.items():
            rows.append((f"keys from {label}", f"{n}  ({self.sources.get(label, '-')})"))
        for label, n in self.shadowed.items():
            rows.append((f"shadowed in {label}", f"{n} (taken from the .bin instead)"))
        rows.append(("ignored keys", str(len(self.ignored))))
        lora = (
            f"{len(self.lora_merged)} weights, r={self.lora_r}, alpha={self.lora_alpha:g}, "
            f"scale={self.lora_scaling:g}"
            if self.lora_merged
            else "none"
        )
        rows.append(("LoRA merged", lora))
        rows.append(("vocab", str(self.vocab_size)))
        ids = ", ".join(f"{k.removesuffix('_token_id')}={v}" for k, v in self.token_ids.items())
        rows.append(("token ids", ids))
        if self.config_overrides:
            changed = ", ".join(f"{k}={b}" for k, (_, b) in self.config_overrides.items())
            rows.append(("config vs preset", changed))
        return rows

    def _source_dtypes(self) -> str:
        return "; ".join(f"{k} {'/'.join(v)}" for k, v in self.source_dtypes.items())

    def format_table(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)

    def __str__(self) -> str:
        return self.format_table()


# ---------------------------------------------------------------------------- helpers
def _fmt_keys(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" … (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def expected_token_ids(geometry: str, base_tokenizer: Any = None) -> dict[str, int]:
    """GSVA's ``[SEG]``/``[REJ]``/``<im_start>``/``<im_end>`` ids for ``geometry``.

    gsva-7b / gsva-13b return the released ids (§3.3). Any other geometry derives them from
    ``base_tokenizer`` (before GSVA's tokens are added) by GSVA's rule: tokens the base already
    has keep their id, the others are appended in the order [SEG], [REJ], <im_start>, <im_end>.
    (The rule reproduces both released layouts, which the constants pin down independently.)
    """
    if geometry in GEOMETRY_TOKEN_IDS:
        return dict(GEOMETRY_TOKEN_IDS[geometry])
    if base_tokenizer is None:
        raise ValueError(f"geometry {geometry!r} needs the base tokenizer to derive token ids")
    vocab = base_tokenizer.get_vocab()
    nxt = len(base_tokenizer)
    ids: dict[str, int] = {}
    for name, tok in (
        ("seg_token_id", SEG),
        ("rej_token_id", REJ),
        ("im_start_token_id", IM_START),
        ("im_end_token_id", IM_END),
    ):
        if tok in vocab:
            ids[name] = vocab[tok]
        else:
            ids[name], nxt = nxt, nxt + 1
    return ids


def detect_geometry(llava_config: dict) -> str:
    """Preset whose (hidden_size, num_hidden_layers) equals the LLaVA config's."""
    text = llava_config.get("text_config", llava_config)
    key = (text.get("hidden_size"), text.get("num_hidden_layers"))
    for name, make in PRESETS.items():
        c = make()
        if (c.hidden_size, c.num_hidden_layers) == key:
            return name
    raise ConversionError(
        f"no preset matches the LLaVA config (hidden_size={key[0]}, layers={key[1]}); "
        f"pass geometry= one of {', '.join(PRESETS)}"
    )


def merge_lora(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float, r: int
) -> torch.Tensor:
    """``W [out×in] + (B [out×r] @ A [r×in]) · α / r``, computed in float32."""
    return weight.float() + (lora_b.float() @ lora_a.float()) * (alpha / r)


@functools.lru_cache(maxsize=1)
def vision_prefix() -> str:
    """Our key prefix of the CLIP tower's ``embeddings``/``encoder``/… modules.

    transformers ≥ 5 builds ``CLIPVisionModel`` without the ``vision_model.`` level (older
    versions had it), so this is read off the installed version instead of assumed.
    """
    from accelerate import init_empty_weights
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tiny = CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        image_size=4,
        patch_size=2,
    )
    with init_empty_weights():
        keys = list(CLIPVisionModel(tiny).state_dict())
    inner = "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""
    return "llava.model.vision_tower." + inner


# ---------------------------------------------------------------------------- reading
@dataclass
class _Entry:
    """One tensor of a source file; safetensors entries are read only when written."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


def _torch_load(path: Path) -> dict:
    """``torch.load`` restricted to tensors (payloads refused), memory-mapped when possible."""
    kwargs = {"map_location": "cpu", "weights_only": True}
    try:
        try:
            return torch.load(path, mmap=True, **kwargs)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, **kwargs)  # legacy (non-zip) torch.save format
    except pickle.UnpicklingError as exc:
        first = _one_line(str(exc)).split(". ")[0]
        raise ConversionError(
            f"refusing to unpickle {path}: it holds objects other than tensors (loaded with "
            f"weights_only=True, nothing was executed; {first})"
        ) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise ConversionError(f"cannot read {path}: {_one_line(exc)}") from exc


def _torch_entries(path: Path) -> dict[str, _Entry]:
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    # DeepSpeed/trainer wrappers: {"module": state_dict} or {"state_dict": state_dict}.
    for wrapper in ("module", "state_dict", "model"):
        if set(obj) == {wrapper} and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path} has non-tensor entries: {_fmt_keys(map(str, bad))}")
    # Tensors are memory-mapped (zip format), so "loading" one later costs nothing here.
    return {k: _Entry(tuple(v.shape), v.dtype, lambda t=v: t) for k, v in obj.items()}


def _safetensors_entries(path: Path, stack: ExitStack) -> dict[str, _Entry]:
    from safetensors import safe_open

    try:
        handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several error types
        raise ConversionError(f"cannot read {path}: {_one_line(exc)}") from exc
    out = {}
    for key in handle.keys():
        sl = handle.get_slice(key)
        dtype = _ST_TORCH.get(sl.get_dtype())
        if dtype is None:
            raise ConversionError(f"{path}: tensor {key} has unsupported dtype {sl.get_dtype()}")
        out[key] = _Entry(tuple(sl.get_shape()), dtype, functools.partial(handle.get_tensor, key))
    return out


def _weight_files(d: Path) -> list[Path]:
    """Weight files of an HF-style folder: an index's shards, else the single/sharded files."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            data = _read_json(d / index, "weight index")
            shards = sorted(set(data.get("weight_map", {}).values()))
            if not shards:
                raise ConversionError(f"{d / index} has an empty weight_map")
            return [d / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).is_file():
            return [d / single]
    # Never glob *.bin: HF folders may hold training_args.bin, which is no state dict.
    files = sorted(d.glob("model-*.safetensors")) or sorted(d.glob("pytorch_model-*.bin"))
    if not files:
        raise ConversionError(f"no weight files (safetensors or pytorch_model*.bin) in {d}")
    return files


def _open_weights(path: Path, stack: ExitStack) -> dict[str, _Entry]:
    """All tensors of a file or an HF-style folder (sharded or not, safetensors or torch)."""
    if not path.exists():
        raise ConversionError(f"{path} does not exist")
    files = _weight_files(path) if path.is_dir() else [path]
    entries: dict[str, _Entry] = {}
    for f in files:
        if not f.is_file():
            raise ConversionError(f"weight file {f} does not exist")
        part = _safetensors_entries(f, stack) if f.suffix == ".safetensors" else _torch_entries(f)
        dup = set(part) & set(entries)
        if dup:
            raise ConversionError(f"keys appear in more than one shard: {_fmt_keys(dup)}")
        entries.update(part)
    return entries


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"cannot read the {what} {path}: {_one_line(exc)}") from exc


# ---------------------------------------------------------------------------- mapping
def _rules(vt: str) -> dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]]]:
    """Per source: ((source prefix, our prefix), …) and explicitly ignored source prefixes."""
    llama = (
        ("model.embed_tokens.", LM + "embed_tokens."),
        ("model.layers.", LM + "layers."),
        ("model.norm.", LM + "norm."),
        ("lm_head.", LM_HEAD),
    )
    return {
        GSVA_BIN: (
            llama
            + (
                ("model.mm_projector.", PROJECTOR),
                ("model.vision_tower.vision_tower.vision_model.", vt),
                ("model.visual_model.", SAM),
                ("model.text_hidden_fcs.", FCS),
            ),
            (),
        ),
        # LLaVA's own projector is deliberately never used (see module docstring).
        LLAVA: (
            llama
            + (
                ("model.vision_tower.vision_tower.vision_model.", vt),
                ("model.vision_tower.vision_model.", vt),
            ),
            ("model.mm_projector.",),
        ),
        CLIP: (
            (("vision_model.", vt),),
            ("text_model.", "text_projection.", "visual_projection.", "logit_scale"),
        ),
        SAM_CKPT: (
            tuple((p, SAM + p) for p in ("image_encoder.", "prompt_encoder.", "mask_decoder.")),
            ("pixel_mean", "pixel_std"),
        ),
    }


def _map_key(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for src, dst in rules:
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def _fill_order(target: str, vt: str) -> tuple[str, ...]:
    """Sources that may provide ``target`` when the .bin lacks it, in priority order."""
    if target.startswith((LM, LM_HEAD)):
        return (LLAVA,)
    if target.startswith(vt):
        return (CLIP, LLAVA)
    if target.startswith(SAM):
        return (SAM_CKPT,)
    return ()  # projector, text_hidden_fcs: only the .bin has the trained ones


def _buffer_to_ignore(target: str, vt: str, entry: _Entry) -> bool:
    """Non-learned buffers some savers include: rotary inv_freq, SAM pixel_mean/std, CLIP
    position_ids (an arange; verified, since a different value would change the model)."""
    if target.endswith("rotary_emb.inv_freq") or target in (SAM + "pixel_mean", SAM + "pixel_std"):
        return True
    if target == vt + "embeddings.position_ids":
        t = entry.load()
        if not torch.equal(t.reshape(-1).long(), torch.arange(t.numel())):
            raise ConversionError(f"CLIP {target} is not 0..{t.numel() - 1}")
        return True
    return False


@dataclass
class _Mapped:
    targets: dict[str, tuple[str, _Entry]] = field(default_factory=dict)  # ours → (key, entry)
    unknown: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _map_source(entries: dict[str, _Entry], rules, ignore: tuple[str, ...], vt: str) -> _Mapped:
    out = _Mapped()
    for key, entry in entries.items():
        if ignore and key.startswith(ignore):
            out.ignored.append(key)
            continue
        target = _map_key(key, rules)
        if target is None:
            out.unknown.append(key)
        elif _buffer_to_ignore(target, vt, entry):
            out.ignored.append(key)
        else:
            out.targets[target] = (key, entry)
    return out


@dataclass
class _Lora:
    module: str  # official module path without prefix, e.g. model.layers.0.self_attn.q_proj
    a: tuple[str, _Entry] | None = None
    b: tuple[str, _Entry] | None = None


def _split_official(entries: dict[str, _Entry]) -> tuple[dict[str, _Entry], dict[str, _Lora], set]:
    """Strip the PEFT prefix, rename peft ≥ 0.7 ``base_layer`` weights, pull out LoRA A/B."""
    plain: dict[str, _Entry] = {}
    lora: dict[str, _Lora] = {}
    adapters: set[str] = set()
    dup: list[str] = []
    for raw, entry in entries.items():
        key = raw.removeprefix(PEFT_PREFIX)
        m = _LORA_RE.match(key)
        if m:
            adapters.add(m["adapter"] or "")
            item = lora.setdefault(m["module"], _Lora(m["module"]))
            setattr(item, m["ab"].lower(), (raw, entry))
            continue
        key = key.replace(".base_layer.", ".", 1)
        if key in plain:
            dup.append(raw)
        plain[key] = entry
    if dup:
        raise ConversionError(
            f"base weights stored twice (plain and base_layer naming): {_fmt_keys(dup)}"
        )
    if len(adapters) > 1:
        raise ConversionError(f"more than one LoRA adapter in the .bin: {sorted(adapters)}")
    return plain, lora, adapters


# ---------------------------------------------------------------------------- config
def _count(shapes: dict[str, tuple], prefix: str) -> int:
    return len({k[len(prefix) :].split(".", 1)[0] for k in shapes if k.startswith(prefix)})


def _derive_config(
    geometry: str, llava_cfg: dict, clip_heads: int | None, shapes: dict[str, tuple], vt: str
) -> tuple[GSVAConfig, dict[str, tuple]]:
    """Preset defaults, LLaMA geometry from the LLaVA config.json, everything else that the
    tensor shapes determine from the shapes (vocab, CLIP, SAM). Heads that no shape reveals
    (CLIP: from clip_dir's config.json if given; SAM decoder) stay at the preset."""
    base = preset(geometry)
    cfg = dataclasses.replace(base, name=geometry)
    text = llava_cfg.get("text_config", llava_cfg)
    try:
        cfg.hidden_size = int(text["hidden_size"])
        cfg.intermediate_size = int(text["intermediate_size"])
        cfg.num_hidden_layers = int(text["num_hidden_layers"])
        cfg.num_attention_heads = int(text["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(f"LLaVA config.json lacks a LLaMA field: {exc}") from None
    cfg.num_key_value_heads = int(text.get("num_key_value_heads") or cfg.num_attention_heads)
    cfg.rms_norm_eps = float(text.get("rms_norm_eps", cfg.rms_norm_eps))
    cfg.max_position_embeddings = int(
        text.get("max_position_embeddings", cfg.max_position_embeddings)
    )
    cfg.rope_theta = float(text.get("rope_theta", cfg.rope_theta))
    select = llava_cfg.get("mm_vision_select_layer", cfg.vision_feature_layer)
    cfg.vision_feature_layer = int(select)
    if LM + "embed_tokens.weight" in shapes:
        cfg.vocab_size = shapes[LM + "embed_tokens.weight"][0]

    patch = shapes.get(vt + "embeddings.patch_embedding.weight")
    if patch:
        cfg.vision_hidden_size, cfg.vision_patch_size = patch[0], patch[-1]
        pos = shapes.get(vt + "embeddings.position_embedding.weight")
        if pos:
            cfg.vision_image_size = math.isqrt(pos[0] - 1) * patch[-1]  # +1: CLS
    if vt + "encoder.layers.0.mlp.fc1.weight" in shapes:
        cfg.vision_intermediate_size = shapes[vt + "encoder.layers.0.mlp.fc1.weight"][0]
        cfg.vision_num_hidden_layers = _count(shapes, vt + "encoder.layers.")
    if clip_heads:
        cfg.vision_num_attention_heads = clip_heads

    enc = SAM + "image_encoder."
    pos = shapes.get(enc + "pos_embed")  # 1×E×E×C
    proj = shapes.get(enc + "patch_embed.proj.weight")
    if pos and proj:
        side, cfg.sam_embed_dim, cfg.sam_patch_size = pos[1], pos[3], proj[-1]
        cfg.sam_image_size = side * proj[-1]
        cfg.sam_depth = _count(shapes, enc + "blocks.")
        glob, windows, head_dims = [], set(), set()
        for i in range(cfg.sam_depth):
            rel = shapes.get(f"{enc}blocks.{i}.attn.rel_pos_h")  # (2·size − 1) × head_dim
            if rel is None:
                continue
            head_dims.add(rel[1])
            if rel[0] == 2 * side - 1:
                glob.append(i)
            else:
                windows.add((rel[0] + 1) // 2)
        if len(head_dims) == 1:
            cfg.sam_num_heads = cfg.sam_embed_dim // head_dims.pop()
        if len(windows) == 1:
            cfg.sam_window_size = windows.pop()
        cfg.sam_global_attn_indexes = glob
    if SAM + "prompt_encoder.no_mask_embed.weight" in shapes:
        cfg.sam_prompt_dim = shapes[SAM + "prompt_encoder.no_mask_embed.weight"][1]
    if SAM + "prompt_encoder.mask_downscaling.3.weight" in shapes:
        cfg.sam_mask_in_chans = shapes[SAM + "prompt_encoder.mask_downscaling.3.weight"][0]
    dec = SAM + "mask_decoder."
    if dec + "transformer.layers.0.mlp.lin1.weight" in shapes:
        cfg.sam_decoder_mlp_dim = shapes[dec + "transformer.layers.0.mlp.lin1.weight"][0]
        cfg.sam_decoder_depth = _count(shapes, dec + "transformer.layers.")
    if dec + "iou_prediction_head.layers.0.weight" in shapes:
        cfg.sam_iou_head_hidden_dim = shapes[dec + "iou_prediction_head.layers.0.weight"][0]

    overrides = {
        f.name: (getattr(base, f.name), getattr(cfg, f.name))
        for f in dataclasses.fields(cfg)
        if f.name != "name" and getattr(base, f.name) != getattr(cfg, f.name)
    }
    return cfg, overrides


def _clip_heads(clip_dir: Path | None) -> int | None:
    if clip_dir is None or not (clip_dir / "config.json").is_file():
        return None
    data = _read_json(clip_dir / "config.json", "CLIP config")
    heads = data.get("vision_config", data).get("num_attention_heads")
    return int(heads) if heads else None


def _meta_shapes(cfg: GSVAConfig) -> dict[str, tuple[int, ...]]:
    """Key → shape of ``GSVAModel(cfg)`` without allocating it (meta parameters)."""
    from accelerate import init_empty_weights

    from gsva_ros.model.gsva import GSVAModel

    with init_empty_weights(include_buffers=False):
        model = GSVAModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- writing
def _write_safetensors(
    path: Path,
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str],
    on_tensor: Callable[[], None],
) -> int:
    """Write a safetensors file one tensor at a time (header first, then the raw bytes).

    ``safetensors.torch.save_file`` needs every tensor in memory at once — 28 GB extra for a
    7B model in fp32 — while here only one merged tensor exists at a time and the sources
    stay memory-mapped. The result is read back with ``safe_open`` by the caller.
    """
    if sys.byteorder != "little":
        raise ConversionError("safetensors are little-endian; this machine is not")
    names = sorted(specs)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in names:
        shape, dtype = specs[name]
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section, as safetensors itself does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = produce(name).contiguous()
            if (tuple(t.shape), t.dtype) != specs[name]:
                raise ConversionError(f"internal: {name} came out as {tuple(t.shape)} {t.dtype}")
            f.write(t.reshape(-1).view(torch.uint8).numpy())
            on_tensor()
    return offset


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"output directory {out} is not empty (use overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)


def _install(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an old ``out`` is removed only after that."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)  # put the previous checkpoint back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- main entry
def convert_official(
    gsva_bin: str | os.PathLike,
    llava_dir: str | os.PathLike,
    sam_checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    clip_dir: str | os.PathLike | None = None,
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    geometry: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionReport:
    """Convert an official GSVA ``.bin`` (+ LLaVA folder, SAM ``.pth``, optional HF CLIP
    folder) into ``out_dir`` (``config.json``, ``model.safetensors``, tokenizer files).

    ``gsva_bin`` may also be a folder of shards with an index (DeepSpeed ≥ 0.15.3). ``geometry``
    is a preset name (default: detected from the LLaVA config.json). ``lora_r`` defaults to the
    geometry's release value (7B 8, 13B 64; others: the rank found in the file) and must match
    the rank of the stored LoRA tensors; ``lora_r=0`` declares a file without LoRA. ``lora_alpha``
    defaults to 16. ``dtype`` is the stored precision (merges are computed in float32).

    Raises :class:`ConversionError` on anything unexpected; nothing is left at ``out_dir`` then
    (the checkpoint is assembled in a hidden sibling folder and renamed at the end).
    """
    from tqdm import tqdm
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out_dtype = DTYPES[dtype]
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    llava_dir = Path(llava_dir)
    clip_path = Path(clip_dir) if clip_dir is not None else None
    llava_cfg = _read_json(llava_dir / "config.json", "LLaVA config")

    if geometry is None:
        geometry = detect_geometry(llava_cfg)
    elif geometry not in PRESETS:
        raise ConversionError(f"unknown geometry {geometry!r}; choose from {', '.join(PRESETS)}")
    else:
        found, want = _detect_or_none(llava_cfg), geometry
        if found is not None and found != want:
            raise ConversionError(f"geometry {want} requested but the LLaVA config is {found}")
    vt = vision_prefix()
    rules = _rules(vt)

    paths = {GSVA_BIN: Path(gsva_bin), LLAVA: llava_dir, SAM_CKPT: Path(sam_checkpoint)}
    if clip_path is not None:
        paths[CLIP] = clip_path

    with ExitStack() as stack:
        raw = {label: _open_weights(p, stack) for label, p in paths.items()}
        plain, lora, _ = _split_official(raw[GSVA_BIN])
        mapped = {GSVA_BIN: _map_source(plain, rules[GSVA_BIN][0], (), vt)}
        for label in (LLAVA, CLIP, SAM_CKPT):
            if label in raw:
                mapped[label] = _map_source(raw[label], *rules[label], vt)

        # Choose a source per target: the .bin first, then that part's own base artifact.
        chosen: dict[str, tuple[str, str, _Entry]] = {
            t: (GSVA_BIN, key, entry) for t, (key, entry) in mapped[GSVA_BIN].targets.items()
        }
        shadowed: dict[str, int] = {}
        for target in sorted({t for m in mapped.values() for t in m.targets}):
            for label in _fill_order(target, vt):
                if label in mapped and target in mapped[label].targets:
                    if target in chosen:
                        shadowed[label] = shadowed.get(label, 0) + 1
                    else:
                        key, entry = mapped[label].targets[target]
                        chosen[target] = (label, key, entry)
                    break
        shapes = {t: e.shape for t, (_, _, e) in chosen.items()}
        cfg, overrides = _derive_config(geometry, llava_cfg, _clip_heads(clip_path), shapes, vt)

        # Tokenizer: the LLaVA base plus GSVA's tokens, ids checked against the release.
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(llava_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConversionError(
                f"cannot load the tokenizer of {llava_dir}: {_one_line(exc)}"
            ) from None
        want_ids = expected_token_ids(geometry, tokenizer)
        add_gsva_tokens(tokenizer)
        try:
            ids = token_ids(tokenizer)
        except ValueError as exc:
            raise ConversionError(str(exc)) from None
        wrong = {k: (ids[k], v) for k, v in want_ids.items() if ids[k] != v}
        if wrong:
            detail = ", ".join(f"{k} {a} (expected {b})" for k, (a, b) in wrong.items())
            raise ConversionError(
                f"token ids of {llava_dir} do not match {geometry}: {detail}; wrong LLaVA base?"
            )
        for k, v in ids.items():
            setattr(cfg, k, v)
        rows = shapes.get(LM + "embed_tokens.weight", (None,))[0]
        if rows is not None and rows != len(tokenizer):
            raise ConversionError(
                f"embed_tokens has {rows} rows but the tokenizer of {llava_dir} has "
                f"{len(tokenizer)} tokens with GSVA's added; wrong LLaVA base?"
            )

        expected = _meta_shapes(cfg)
        r, alpha, lora_targets = _plan_lora(
            lora, rules[GSVA_BIN][0], expected, shapes, lora_r, lora_alpha, geometry
        )
        _check_keys(expected, chosen, mapped, geometry)

        # Write into a hidden sibling folder; rename only once everything succeeded.
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        try:
            specs = {
                k: (
                    expected[k],
                    out_dtype if chosen[k][2].dtype.is_floating_point else chosen[k][2].dtype,
                )
                for k in expected
            }

            def produce(target: str) -> torch.Tensor:
                t = chosen[target][2].load()
                if target in lora_targets:
                    (_, a), (_, b) = lora_targets[target]
                    t = merge_lora(t, a.load(), b.load(), alpha, r)
                return t.to(specs[target][1])

            metadata = {
                "format": "gsva_ros",
                "name": cfg.name,
                "converted_from": paths[GSVA_BIN].name,
                "lora_r": str(r),
                "lora_alpha": f"{alpha:g}",
            }
            with tqdm(
                total=len(specs), desc="merge+write", unit="tensor", disable=not progress
            ) as bar:
                nbytes = _write_safetensors(
                    tmp / WEIGHTS_FILE, specs, produce, metadata, lambda: bar.update(1)
                )
            _verify_written(tmp / WEIGHTS_FILE, specs)
            if r:
                cfg.lora_r, cfg.lora_alpha = r, alpha
            cfg.save(tmp / CONFIG_FILE)
            tokenizer.save_pretrained(str(tmp))
            _install(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    keys_from: dict[str, int] = {}
    for label, _, _ in chosen.values():
        keys_from[label] = keys_from.get(label, 0) + 1
    source_dtypes: dict[str, set[str]] = {}
    for label, _, entry in chosen.values():
        source_dtypes.setdefault(label, set()).add(str(entry.dtype).removeprefix("torch."))
    return ConversionReport(
        out_dir=out,
        geometry=geometry,
        dtype=dtype,
        sources={k: str(v) for k, v in paths.items()},
        keys_from={k: keys_from[k] for k in (GSVA_BIN, LLAVA, CLIP, SAM_CKPT) if k in keys_from},
        shadowed=shadowed,
        ignored=[f"{label}:{k}" for label, m in mapped.items() for k in m.ignored],
        source_dtypes={k: sorted(v) for k, v in source_dtypes.items()},
        lora_merged=sorted(lora_targets),
        lora_r=r,
        lora_alpha=alpha,
        token_ids=ids,
        vocab_size=cfg.vocab_size,
        num_tensors=len(specs),
        num_params=sum(math.prod(s) for s, _ in specs.values()),
        num_bytes=nbytes,
        config_overrides=overrides,
    )


def _detect_or_none(llava_config: dict) -> str | None:
    try:
        return detect_geometry(llava_config)
    except ConversionError:
        return None


def _plan_lora(
    lora: dict[str, _Lora],
    rules: tuple[tuple[str, str], ...],
    expected: dict[str, tuple],
    shapes: dict[str, tuple],
    lora_r: int | None,
    lora_alpha: float | None,
    geometry: str,
) -> tuple[int, float, dict[str, tuple]]:
    """Check the LoRA tensors against their base weights and the requested rank.

    Returns (r, alpha, {our weight name: ((key, A entry), (key, B entry))}).
    """
    alpha = float(DEFAULT_LORA_ALPHA if lora_alpha is None else lora_alpha)
    want = lora_r if lora_r is not None else DEFAULT_LORA_R.get(geometry)
    why = "lora_r option" if lora_r is not None else f"{geometry} default"
    if not lora:
        if want:
            raise ConversionError(
                f"the .bin has no LoRA tensors but r={want} ({why}); the released GSVA files "
                f"are unmerged — if this one is already merged, pass lora_r=0"
            )
        return 0, alpha, {}
    problems, targets, ranks = [], {}, set()
    for module, item in sorted(lora.items()):
        if item.a is None or item.b is None:
            have = (item.a or item.b)[0]
            problems.append(f"{have} has no lora_{'B' if item.b is None else 'A'} partner")
            continue
        target = _map_key(module + ".weight", rules)
        if target is None or target not in expected:
            problems.append(f"unconsumed LoRA tensors {item.a[0]}, {item.b[0]}")
            continue
        a, b = item.a[1].shape, item.b[1].shape
        base = shapes.get(target)
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            problems.append(f"LoRA of {module}: A {a} and B {b} do not form B@A")
            continue
        if base is not None and base != (b[0], a[1]):
            problems.append(f"LoRA of {module}: B@A is {(b[0], a[1])}, base weight is {base}")
            continue
        ranks.add(a[0])
        targets[target] = (item.a, item.b)
    if problems:
        raise ConversionError("; ".join(problems[:8]) + (" …" if len(problems) > 8 else ""))
    if len(ranks) != 1:
        raise ConversionError(f"LoRA tensors have different ranks {sorted(ranks)}")
    r = ranks.pop()
    if want is not None and want != r:
        raise ConversionError(
            f"LoRA rank in the .bin is {r} but r={want} ({why}); a wrong r changes α/r "
            f"(wrong base model or options?)"
        )
    return r, alpha, targets


def _check_keys(expected: dict, chosen: dict, mapped: dict[str, _Mapped], geometry: str) -> None:
    """Fail with every missing, unconsumed and mis-shaped key named (one message)."""
    problems = []
    proj = [k for k in expected if k.startswith(PROJECTOR) and k not in chosen]
    if proj:
        problems.append(
            "the .bin has no model.mm_projector.{weight,bias}: the released code would use a "
            "randomly re-created projector and LLaVA's is not the one GSVA was trained with"
        )
    missing = [k for k in expected if k not in chosen and not k.startswith(PROJECTOR)]
    if missing:
        problems.append(f"missing {len(missing)} keys: {_fmt_keys(missing)}")
    unconsumed = [f"{label}:{k}" for label, m in mapped.items() for k in m.unknown]
    unconsumed += [
        f"{label}:{key}"
        for label, m in mapped.items()
        for target, (key, _) in m.targets.items()
        if target not in expected
    ]
    if unconsumed:
        problems.append(f"unconsumed {len(unconsumed)} keys: {_fmt_keys(unconsumed)}")
    bad = [
        f"{label}:{key} {e.shape} vs {expected[t]}"
        for t, (label, key, e) in chosen.items()
        if t in expected and e.shape != expected[t]
    ]
    if bad:
        problems.append(f"shape mismatch ({geometry}) for {len(bad)} keys: {_fmt_keys(bad, 5)}")
    if problems:
        raise ConversionError("; ".join(problems))


def _verify_written(path: Path, specs: dict[str, tuple]) -> None:
    """Read the header back with safetensors itself (catches any writer mistake)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            got = {
                k: (tuple(f.get_slice(k).get_shape()), _ST_TORCH[f.get_slice(k).get_dtype()])
                for k in f.keys()
            }
    except Exception as exc:  # noqa: BLE001
        raise ConversionError(f"written {path} does not read back: {_one_line(exc)}") from exc
    if got != specs:
        raise ConversionError(f"written {path} does not match what was planned")
