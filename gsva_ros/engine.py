"""``GSVAEngine``: one object owns the model, device, dtype and per-frame caches.

One call answers one command on one image::

    engine = GSVAEngine("tiny")
    result = engine.segment(image_rgb_uint8, "the red mug, the spoon and the knife", frame_key=7)

A second command with the same ``frame_key`` reuses that frame's SAM embedding, CLIP features
and the KV cache of the image prefix of the prompt (everything up to ``<im_end>``), so it only
pays for the question, the answer and the mask decoder. Frames are evicted oldest-first
beyond ``cache_frames``. The engine is thread-safe (one inference at a time).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gsva_ros.model.checkpoint import load_checkpoint
from gsva_ros.model.decoding import SlotDecision, decode_slots, generate
from gsva_ros.model.gsva import GSVAModel
from gsva_ros.model.masks import label_objects
from gsva_ros.model.preprocess import clip_preprocess, sam_preprocess
from gsva_ros.model.prompt import answer_text, encode_conversation
from gsva_ros.model.text import (
    DEFAULT_MAX_COMMAND_CHARS,
    DEFAULT_MAX_EXPRESSIONS,
    split_command,
)
from gsva_ros.result import SegmentationResult, Target

DECODINGS = ("slots", "generate")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_IMAGE_PIXELS = 40_000_000  # refuse absurd frames before allocating float copies
MIN_IMAGE_SIDE = 2


class InputError(ValueError):
    """An image or command the engine cannot answer (message is user-facing)."""


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """``"tiny"`` (or another bundled name) → the shipped model directory; else a path."""
    path = Path(model)
    if path.is_dir() or os.sep in str(model) or str(model).startswith("."):
        return path
    candidates = [Path(__file__).resolve().parent.parent / "models" / str(model)]
    if os.environ.get("GSVA_ROS_MODELS"):
        candidates.insert(0, Path(os.environ["GSVA_ROS_MODELS"]) / str(model))
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("gsva_ros")) / "models" / str(model))
    except Exception:  # noqa: BLE001 - no ROS install, or package not installed there
        pass
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        return torch.device(device)
    raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}") from None


@dataclass
class FrameFeatures:
    """Everything about one frame that does not depend on the command."""

    image_size: tuple[int, int]
    resized: tuple[int, int]
    image_features: torch.Tensor  # 1×256×H
    sam_embedding: torch.Tensor  # 1×C×h×w
    prefix_ids: list[int]
    cache: object  # KV cache holding exactly prefix_ids

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_ids)


@dataclass
class EngineStats:
    """Counters used by tests and diagnostics (how much work the caches saved)."""

    clip_encodes: int = 0
    sam_encodes: int = 0
    prefills: int = 0
    commands: int = 0
    cache_hits: int = 0
    failures: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class GSVAEngine:
    def __init__(
        self,
        model: str | os.PathLike | GSVAModel = "tiny",
        device: str = "auto",
        dtype: str = "auto",
        decoding: str = "slots",
        instance_split: bool = True,
        min_object_area: int = 16,
        max_expressions: int = DEFAULT_MAX_EXPRESSIONS,
        max_command_chars: int = DEFAULT_MAX_COMMAND_CHARS,
        cache_frames: int = 2,
        tokenizer=None,
    ) -> None:
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
        if cache_frames < 0:
            raise ValueError("cache_frames must be >= 0")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if isinstance(model, GSVAModel):
            if tokenizer is None:
                raise ValueError("a tokenizer is required with an in-memory model")
            self.model, self.tokenizer = model.to(self.device, self.dtype).eval(), tokenizer
            self.model_name = model.config.name
        else:
            model_dir = resolve_model_dir(model)
            self.model, self.tokenizer = load_checkpoint(model_dir, self.device, self.dtype)
            self.model_name = f"{self.model.config.name} ({model_dir})"
        self.config = self.model.config
        self.decoding = decoding
        self.instance_split = instance_split
        self.min_object_area = min_object_area
        self.max_expressions = max_expressions
        self.max_command_chars = max_command_chars
        self.cache_frames = cache_frames
        self.stats = EngineStats()
        self._frames: OrderedDict[Hashable, FrameFeatures] = OrderedDict()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ public API
    def segment(
        self,
        image: np.ndarray,
        command: str,
        frame_key: Hashable | None = None,
        decoding: str | None = None,
        masks_for_rejected: bool = False,
    ) -> SegmentationResult:
        """Answer ``command`` on an RGB uint8 HxWx3 ``image``.

        Raises :class:`InputError` (bad image), :class:`gsva_ros.model.text.CommandError`
        (bad command), ValueError (bad argument). Any other exception leaves the engine usable:
        the frame caches are dropped so no half-updated state survives.
        """
        decoding = decoding or self.decoding
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
        self.check_image(image)
        expressions = split_command(command, self.max_expressions, self.max_command_chars)
        with self._lock:
            try:
                return self._segment(
                    image, command, expressions, frame_key, decoding, masks_for_rejected
                )
            except Exception:
                self.stats.failures += 1
                self.clear_cache()
                raise

    def encode_frame(self, image: np.ndarray, frame_key: Hashable) -> None:
        """Encode a frame ahead of any command (continuous mode pays only for the text)."""
        self.check_image(image)
        with self._lock:
            try:
                self._frame(image, frame_key, {})
            except Exception:
                self.clear_cache()
                raise

    def clear_cache(self) -> None:
        with self._lock:
            self._frames.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def close(self) -> None:
        """Drop caches and the model; frees GPU memory (lifecycle cleanup)."""
        with self._lock:
            self._frames.clear()
            self.model = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @property
    def cached_frames(self) -> int:
        return len(self._frames)

    @staticmethod
    def check_image(image: np.ndarray) -> None:
        if not isinstance(image, np.ndarray):
            raise InputError(f"image must be a numpy array, got {type(image).__name__}")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"image must be uint8 HxWx3 RGB, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        if h < MIN_IMAGE_SIDE or w < MIN_IMAGE_SIDE:
            raise InputError(
                f"image is too small ({w}x{h}); need at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}"
            )
        if h * w > MAX_IMAGE_PIXELS:
            raise InputError(f"image is too large ({w}x{h}); limit is {MAX_IMAGE_PIXELS} pixels")

    # ------------------------------------------------------------------ internals
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _now(self) -> float:
        self._sync()
        return time.perf_counter()

    @torch.inference_mode()
    def _frame(
        self, image: np.ndarray, key: Hashable | None, t: dict[str, float]
    ) -> tuple[FrameFeatures, bool]:
        """The frame's features, from the cache when ``key`` was seen → (features, cache hit)."""
        if key is not None and key in self._frames:
            frame = self._frames[key]
            if frame.image_size == image.shape[:2]:
                self._frames.move_to_end(key)
                self.stats.cache_hits += 1
                t.update(sam=0.0, clip=0.0, prefill=0.0)
                return frame, True
        cfg, m = self.config, self.model
        t0 = self._now()
        sam_px, resized = sam_preprocess(image, cfg.sam_image_size)
        sam_emb = m.encode_sam(sam_px[None].to(self.device))
        t1 = self._now()
        clip_px = clip_preprocess(image, cfg.vision_image_size)
        feats = m.encode_clip(clip_px[None].to(self.device))
        t2 = self._now()
        prefix = encode_conversation(self.tokenizer, cfg, ["x"], with_answer=False)
        prefix_ids = prefix.ids[: prefix.prefix_len]
        ids = torch.tensor([prefix_ids], device=self.device)
        _, cache = m.run_language(m.embed(ids, feats), use_cache=True)
        t3 = self._now()
        self.stats.sam_encodes += 1
        self.stats.clip_encodes += 1
        self.stats.prefills += 1
        t.update(sam=(t1 - t0) * 1e3, clip=(t2 - t1) * 1e3, prefill=(t3 - t2) * 1e3)
        frame = FrameFeatures(image.shape[:2], resized, feats, sam_emb, prefix_ids, cache)
        if key is not None and self.cache_frames > 0:
            self._frames[key] = frame
            while len(self._frames) > self.cache_frames:
                self._frames.popitem(last=False)
        return frame, False

    @torch.inference_mode()
    def _segment(
        self,
        image: np.ndarray,
        command: str,
        expressions: list[str],
        key: Hashable | None,
        decoding: str,
        masks_for_rejected: bool,
    ) -> SegmentationResult:
        t: dict[str, float] = {}
        start = self._now()
        frame, cached = self._frame(image, key, t)
        cfg, m = self.config, self.model
        conv = encode_conversation(self.tokenizer, cfg, expressions, with_answer=True)
        if conv.ids[: frame.prefix_len] != frame.prefix_ids:
            raise RuntimeError("prompt prefix differs from the cached frame prefix")
        note = ""
        t_dec = self._now()
        try:
            if decoding == "generate":
                prompt_ids = conv.ids[: conv.prompt_len]
                gen = generate(m, prompt_ids, frame.prefix_len, frame.cache, cfg.max_new_tokens)
                response = self.tokenizer.decode(gen.token_ids, skip_special_tokens=False).strip()
                slots = gen.slots
                if len(slots) != len(expressions):
                    note = (
                        f"generate produced {len(slots)} slot(s) for {len(expressions)} "
                        f"expression(s); answered with slot decoding instead"
                    )
                    self._crop(frame)
                    decoding = "slots"
            if decoding == "slots":
                slots = decode_slots(
                    m, conv.ids, conv.slot_positions, frame.prefix_len, frame.cache
                )
                response = answer_text(expressions, [s.present for s in slots])
        finally:
            self._crop(frame)
        t_masks = self._now()
        targets = self._targets(frame, expressions, slots, masks_for_rejected)
        end = self._now()
        self.stats.commands += 1
        t.update(
            decode=(t_masks - t_dec) * 1e3, masks=(end - t_masks) * 1e3, total=(end - start) * 1e3
        )
        return SegmentationResult(
            command=command,
            expressions=expressions,
            response=response,
            targets=targets,
            image_size=(int(image.shape[0]), int(image.shape[1])),
            decoding=decoding,
            note=note,
            frame_cached=cached,
            timings_ms=t,
        )

    @staticmethod
    def _crop(frame: FrameFeatures) -> None:
        """Roll the frame's KV cache back to the image prefix (copy-on-use without a copy)."""
        extra = frame.cache.get_seq_length() - frame.prefix_len
        if extra > 0:
            frame.cache.crop(-extra)

    def _targets(
        self,
        frame: FrameFeatures,
        expressions: list[str],
        slots: list[SlotDecision],
        masks_for_rejected: bool,
    ) -> list[Target]:
        m = self.model
        want = [i for i, s in enumerate(slots) if s.present or masks_for_rejected]
        masks: dict[int, np.ndarray] = {}
        if want:
            hidden = torch.stack([slots[i].hidden for i in want])
            low_res = m.decode_masks(frame.sam_embedding, m.project_hidden(hidden))
            logits = m.postprocess_masks(low_res, frame.resized, frame.image_size)
            binary = (logits >= 0).cpu().numpy()  # GSVA's eval threshold: logit >= 0
            masks = {i: binary[j] for j, i in enumerate(want)}
        targets = []
        for i, (phrase, s) in enumerate(zip(expressions, slots, strict=True)):
            if s.present:
                labels, boxes = label_objects(masks[i], self.instance_split, self.min_object_area)
                targets.append(Target(phrase, True, s.score, labels, boxes))
            else:
                targets.append(Target(phrase, False, s.score, forced_mask=masks.get(i)))
        return targets
