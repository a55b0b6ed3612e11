"""``GSVAEngine``: one object owns the model, device, dtype and per-frame caches.

One call answers one command on one image::

    engine = GSVAEngine("tiny")
    result = engine.segment(image_rgb_uint8, "the red mug, the spoon and the knife", frame_key=7)

A second command with the same ``frame_key`` reuses that frame's SAM embedding, CLIP features
and the KV cache of the image prefix of the prompt (everything up to ``<im_end>``), so it only
pays for the question, the answer and the mask decoder. Frames are evicted oldest-first
beyond ``cache_frames`` frames or ``cache_bytes`` bytes. The engine is thread-safe (one
inference at a time); :meth:`GSVAEngine.encode_frame` lets a camera callback encode the newest
frame ahead of the command.

Speed options (``docs/benchmarks.md`` has the measurements):

- ``slot_decoding="speculative"`` (default): one language pass for all slots until a [REJ]
  (:func:`gsva_ros.model.decoding.decode_slots_speculative`; same results as ``incremental``).
- ``compile`` (``"auto"``: on for CUDA): the language model runs on a static KV cache
  (:class:`gsva_ros.model.decoding.StaticLM`); on CUDA the SAM encoder, CLIP, the prefix
  prefill, every padded text chunk, the per-token step and the mask decoder (per number of
  prompts) are captured as CUDA graphs; on CPU ``compile=True`` uses ``torch.compile``.
  Any capture/compile failure logs a warning and falls back to eager execution.
- ``sam_attention`` (``"auto"``: ``sdpa`` on CUDA): SAM's attention through SDPA.
- ``quantize="int8"|"nf4"``: bitsandbytes LLM weights (lm_head, text_hidden_fcs, CLIP and
  SAM stay in the model dtype).
- :meth:`GSVAEngine.warmup` runs dummy commands so captures happen before the first real one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gsva_ros.model.checkpoint import load_checkpoint
from gsva_ros.model.decoding import (
    CapacityError,
    CapturedCall,
    DynamicState,
    LanguageState,
    SlotDecision,
    StaticLM,
    decode_slots,
    decode_slots_speculative,
    generate,
)
from gsva_ros.model.gsva import QUANTIZE_MODES, SAM_ATTENTION_MODES, GSVAModel
from gsva_ros.model.masks import label_objects
from gsva_ros.model.preprocess import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    clip_preprocess,
    sam_preprocess,
    sam_resized_size,
)
from gsva_ros.model.prompt import answer_text, encode_conversation, miscopied_slots
from gsva_ros.model.text import (
    DEFAULT_MAX_COMMAND_CHARS,
    DEFAULT_MAX_EXPRESSIONS,
    split_command,
)
from gsva_ros.result import FALLBACK_MISCOPIED, FALLBACK_SLOT_COUNT, SegmentationResult, Target

log = logging.getLogger(__name__)

DECODINGS = ("slots", "generate")
SLOT_DECODINGS = ("speculative", "incremental")
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


COMPILE_MODES = ("auto", "on", "off", "graphs", "inductor")
TEXT_BUDGET = 192  # question + answer skeleton tokens the static KV cache is sized for
# ``generate`` may run this many tokens past the template's answer length before it is cut off:
# a GSVA answer is the skeleton with one choice per slot, so a model still talking by then is
# looping (the tiny model sometimes never emits </s>), and every extra token is a full LLM step.
GENERATE_MARGIN = 8
_WARMUP_KEY = ("gsva-engine-warmup",)


def resolve_compile(compile: bool | str, device: torch.device) -> str:
    """``compile`` option → ``"off"``, ``"graphs"`` (CUDA graphs) or ``"inductor"``.

    ``"auto"``: CUDA graphs on CUDA, off on CPU. ``True``/``"on"``: CUDA graphs on CUDA,
    ``torch.compile`` (inductor) on CPU, where graphs do not exist.
    """
    if isinstance(compile, bool):
        compile = "on" if compile else "off"
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be a bool or one of {COMPILE_MODES}, got {compile!r}")
    cuda = device.type == "cuda"
    if compile == "auto":
        return "graphs" if cuda else "off"
    if compile == "on":
        return "graphs" if cuda else "inductor"
    if compile == "graphs" and not cuda:
        raise ValueError("compile='graphs' needs a CUDA device")
    return compile


def sam_pixels(
    image: np.ndarray, size: int, device: torch.device
) -> tuple[torch.Tensor, tuple[int, int]]:
    """:func:`sam_preprocess` with the float work on ``device`` → (1×3×S×S float32, (h', w')).

    The resize stays on the host (PIL, uint8, so the result is identical); only the small
    uint8 resized image is uploaded, instead of 12 MB of float32 at S = 1024, and the
    normalisation and padding run on the device (float32 subtraction and division are
    correctly rounded, hence equal to NumPy's).
    """
    from PIL import Image

    nh, nw = sam_resized_size(image.shape[0], image.shape[1], size)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    x = torch.from_numpy(np.array(resized)).to(device).to(torch.float32)  # PIL arrays are read-only
    mean = torch.tensor(SAM_PIXEL_MEAN, dtype=torch.float32, device=device)
    std = torch.tensor(SAM_PIXEL_STD, dtype=torch.float32, device=device)
    out = torch.zeros(1, 3, size, size, dtype=torch.float32, device=device)
    out[0, :, :nh, :nw] = ((x - mean) / std).permute(2, 0, 1)
    return out, (nh, nw)


def tensor_bytes(obj: object) -> int:
    """Bytes of device/host memory held by a tensor or a transformers cache (storages counted
    once: a cropped cache still holds the storage of its longest extension)."""
    tensors: list[torch.Tensor] = []
    if isinstance(obj, torch.Tensor):
        tensors = [obj]
    elif hasattr(obj, "layers"):
        for layer in obj.layers:
            tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                        if isinstance(t, torch.Tensor)]
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@dataclass
class FrameFeatures:
    """Everything about one frame that does not depend on the command."""

    image_size: tuple[int, int]
    resized: tuple[int, int]
    image_features: torch.Tensor  # 1×256×H
    sam_embedding: torch.Tensor  # 1×C×h×w
    prefix_ids: list[int]
    # KV of exactly prefix_ids: a transformers cache (eager path), or with a static cache a
    # tensor n_layers×2×1×n_kv×P×head_dim copied into the static buffer on use.
    cache: object
    nbytes: int = 0

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
    evictions: int = 0
    slot_passes: int = 0  # language forward passes spent on slot decoding
    extra: dict[str, int] = field(default_factory=dict)


class _Graphed:
    """``fn`` run through one CUDA graph per input-shape signature (eager when disabled).

    The first failed capture disables graphs for this function and logs a warning; the
    command still gets an (eager) answer. Outputs are cloned: the graph reuses its output.
    """

    def __init__(self, name: str, fn: Callable[..., torch.Tensor], enabled: bool,
                 warnings: list[str]) -> None:
        self.name, self.fn, self.enabled, self.warnings = name, fn, enabled, warnings
        self._calls: dict[tuple, CapturedCall] = {}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.fn(*inputs)
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        call = self._calls.get(key)
        if call is None:
            try:
                call = CapturedCall(self.fn, [x.clone() for x in inputs])
            except Exception as exc:  # noqa: BLE001 - any capture failure → eager
                msg = f"CUDA graph capture of {self.name} failed ({type(exc).__name__}: {exc}); " \
                      f"running it eagerly"
                log.warning(msg)
                self.warnings.append(msg)
                self.enabled, self._calls = False, {}
                torch.cuda.synchronize()
                return self.fn(*inputs)
            self._calls[key] = call
        return call(*inputs).clone()

    @property
    def captured(self) -> int:
        return len(self._calls)


def check_presence_threshold(value: float) -> float:
    """``value`` as a float, or ValueError unless 0 < value < 1."""
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"presence_threshold must be in (0, 1), got {value!r}")
    return value


class GSVAEngine:
    def __init__(
        self,
        model: str | os.PathLike | GSVAModel = "tiny",
        device: str = "auto",
        dtype: str = "auto",
        decoding: str = "slots",
        instance_split: bool = True,
        min_object_area: int = 32,
        max_expressions: int = DEFAULT_MAX_EXPRESSIONS,
        max_command_chars: int = DEFAULT_MAX_COMMAND_CHARS,
        cache_frames: int = 2,
        tokenizer=None,
        cache_bytes: int | None = None,
        slot_decoding: str = "speculative",
        compile: bool | str = "auto",
        static_cache: bool | None = None,
        sam_attention: str = "auto",
        quantize: str = "none",
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        static_capacity: int | None = None,
        presence_threshold: float | None = None,
        reject_empty_masks: bool = True,
        check_generated_phrases: bool = True,
    ) -> None:
        """Load the model and set up caches.

        ``cache_frames``/``cache_bytes``: keep at most that many encoded frames / bytes of
        frame caches (SAM embedding + CLIP features + prefix KV; None = no byte limit).
        ``slot_decoding``: ``speculative`` (default) or ``incremental`` (reference).
        ``compile``: see :func:`resolve_compile`. ``static_cache``: run the language model on
        a static KV cache (default: whenever ``compile`` is not off). ``sam_attention``:
        ``auto`` (``sdpa`` on CUDA, segment_anything's ``reference`` on CPU), ``reference``,
        ``matmul`` or ``sdpa``. ``quantize``: ``none``, ``int8`` or ``nf4`` (bitsandbytes).
        ``max_new_tokens`` (default from the model config) / ``min_new_tokens`` bound
        ``generate``; it also stops ``GENERATE_MARGIN`` tokens after the length of the
        template's answer for the command. ``static_capacity``: positions in the static KV
        cache (default: prefix + 192 text tokens + ``max_new_tokens``).
        ``presence_threshold``: a target is present when the [SEG] share of the two-way
        [SEG]/[REJ] softmax reaches it (default: the model config's, 0.5 = GSVA's argmax);
        the attribute can be changed between calls. ``reject_empty_masks``: a ``[SEG]`` whose
        mask keeps no object of ``min_object_area`` pixels is reported absent (score = the
        ``[REJ]`` share) and the result's note says so; False = GSVA's answer as is.
        ``check_generated_phrases``: ``generate`` falls back to slot decoding (and says so in
        the note) when a slot's written text does not name its expression, since that slot's
        mask would follow the phrase the model wrote, not the one asked for.
        """
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
        if slot_decoding not in SLOT_DECODINGS:
            raise ValueError(
                f"slot_decoding must be one of {SLOT_DECODINGS}, got {slot_decoding!r}"
            )
        if cache_frames < 0:
            raise ValueError("cache_frames must be >= 0")
        if cache_bytes is not None and cache_bytes < 0:
            raise ValueError("cache_bytes must be >= 0 (or None for no byte limit)")
        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
        if sam_attention != "auto" and sam_attention not in SAM_ATTENTION_MODES:
            raise ValueError(
                f"sam_attention must be auto or one of {SAM_ATTENTION_MODES}, got {sam_attention!r}"
            )
        if min_new_tokens < 0 or (max_new_tokens is not None and max_new_tokens < 1):
            raise ValueError("need min_new_tokens >= 0 and max_new_tokens >= 1")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.compile_mode = resolve_compile(compile, self.device)
        if quantize != "none":
            _check_quantize_available(quantize, self.device)  # before loading gigabytes
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
        self.slot_decoding = slot_decoding
        self.instance_split = instance_split
        self.min_object_area = min_object_area
        self.max_expressions = max_expressions
        self.max_command_chars = max_command_chars
        self.cache_frames = cache_frames
        self.cache_bytes = cache_bytes
        self.max_new_tokens = max_new_tokens or self.config.max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.quantize = quantize
        self.presence_threshold = (
            self.config.presence_threshold if presence_threshold is None else presence_threshold
        )
        check_presence_threshold(self.presence_threshold)
        self.reject_empty_masks = reject_empty_masks
        self.check_generated_phrases = check_generated_phrases
        self.stats = EngineStats()
        self._warnings: list[str] = []  # fallbacks taken by the captured encoders/decoder
        self._frames: OrderedDict[Hashable, FrameFeatures] = OrderedDict()
        self._lock = threading.RLock()

        if sam_attention == "auto":
            sam_attention = "sdpa" if self.device.type == "cuda" else "reference"
        if self.compile_mode == "graphs" and sam_attention == "reference":
            sam_attention = "matmul"  # same arithmetic, but capturable (no host-built index)
        self.model.set_sam_attention(sam_attention)
        if quantize != "none":
            self.model.quantize_language(quantize)
        # The image prefix (system text … <im_end>) is the same for every command.
        prefix = encode_conversation(self.tokenizer, self.config, ["x"], with_answer=False)
        self._prefix_ids = prefix.ids[: prefix.prefix_len]

        use_static = self.compile_mode != "off" if static_cache is None else static_cache
        self._static: StaticLM | None = None
        if use_static:
            p = len(self._prefix_ids)
            capacity = static_capacity or min(
                self.config.max_position_embeddings, p + TEXT_BUDGET + self.max_new_tokens
            )
            if capacity < p + 16:
                raise ValueError(f"static_capacity {capacity} leaves no room after the {p}-token"
                                 f" image prefix")
            mode = {"graphs": "graphs", "inductor": "inductor"}.get(self.compile_mode, "eager")
            self._static = StaticLM(self.model, capacity, mode=mode)
        graphs = self.compile_mode == "graphs"
        m = self.model
        self._encode_sam = _Graphed("the SAM encoder", m.encode_sam, graphs, self._warnings)
        self._encode_clip = _Graphed("CLIP", m.encode_clip, graphs, self._warnings)
        self._mask_logits = _Graphed(
            "the mask decoder", lambda h, emb: m.decode_masks(emb, m.project_hidden(h)),
            graphs, self._warnings,
        )

    @property
    def warnings(self) -> list[str]:
        """Fallbacks taken so far (a capture or compilation that failed and runs eagerly)."""
        static = self._static.fallbacks if self._static is not None else []
        return list(self._warnings) + list(static)

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

    def encode_frame(self, image: np.ndarray, frame_key: Hashable, wait: bool = True) -> bool:
        """Encode a frame ahead of any command (continuous mode pays only for the text).

        Cheap when there is nothing to do: an already cached ``frame_key`` (same image size)
        returns at once without counting a cache hit, and so does ``frame_key=None`` or
        ``cache_frames=0`` (nothing could be kept). With ``wait=False`` it returns at once
        when another inference holds the engine (a camera callback never queues behind a
        command). Returns True when the frame was encoded now.
        """
        self.check_image(image)
        if frame_key is None or self.cache_frames == 0:
            return False
        if not self._lock.acquire(blocking=wait):
            return False
        try:
            cached = self._frames.get(frame_key)
            if cached is not None and cached.image_size == image.shape[:2]:
                return False
            self._frame(image, frame_key, {})
            return True
        except Exception:
            self.clear_cache()
            raise
        finally:
            self._lock.release()

    @torch.inference_mode()
    def warmup(self, image: np.ndarray | None = None) -> dict[str, float]:
        """Run dummy commands so captures, compilation and lazy CUDA initialisation happen now.

        With CUDA graphs every padded text size and every mask-decoder prompt count up to
        ``max_expressions`` is captured; ``generate`` runs a few tokens. Statistics and frame
        caches are left as they were. Returns ``{"warmup_s": seconds, "graphs": n}``.
        """
        if image is None:
            image = np.full((64, 64, 3), 127, np.uint8)
        self.check_image(image)
        with self._lock:
            saved = dataclasses.replace(self.stats, extra=dict(self.stats.extra))
            max_new = self.max_new_tokens
            start = time.perf_counter()
            try:
                if self._static is not None:
                    self._static.prepare()
                graphs = self.compile_mode == "graphs"
                counts = range(1, self.max_expressions + 1) if graphs else [1]
                for n in counts:
                    exprs = [f"x{i}" for i in range(n)]
                    self._segment(image, ", ".join(exprs), exprs, _WARMUP_KEY, "slots", True)
                self.max_new_tokens = min(max_new, 4)
                self._segment(image, "x", ["x"], _WARMUP_KEY, "generate", False)
            except Exception:
                self.clear_cache()
                raise
            finally:
                self.max_new_tokens = max_new
                self._frames.pop(_WARMUP_KEY, None)
                self.stats = saved
            self._sync()
            graphs = sum(g.captured for g in (self._encode_sam, self._encode_clip,
                                              self._mask_logits))
            if self._static is not None:
                graphs += len(self._static._graphs)
            return {"warmup_s": time.perf_counter() - start, "graphs": float(graphs)}

    def clear_cache(self) -> None:
        with self._lock:
            self._frames.clear()
            if self._static is not None:
                self._static.resident = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def close(self) -> None:
        """Drop caches and the model; frees GPU memory (lifecycle cleanup)."""
        with self._lock:
            self._frames.clear()
            self._static = None
            for g in (self._encode_sam, self._encode_clip, self._mask_logits):
                g.enabled, g._calls = False, {}
            self.model = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @property
    def cached_frames(self) -> int:
        return len(self._frames)

    @property
    def cache_memory_bytes(self) -> int:
        """Bytes held by the frame caches (SAM embeddings, CLIP features, prefix KV)."""
        return sum(f.nbytes for f in self._frames.values())

    def memory_report(self) -> dict[str, int]:
        """Memory in bytes: frame caches, their limit (0 = none), the static KV buffer, the
        model's parameters and buffers, and CUDA's allocator counters (0 on CPU)."""
        model_bytes = 0
        if self.model is not None:
            model_bytes = sum(
                t.numel() * t.element_size()
                for t in list(self.model.parameters()) + list(self.model.buffers())
            )
        cuda = self.device.type == "cuda"
        return {
            "cached_frames": self.cached_frames,
            "cache_bytes": self.cache_memory_bytes,
            "cache_bytes_limit": self.cache_bytes or 0,
            "static_kv_bytes": self._static.nbytes if self._static is not None else 0,
            "model_bytes": model_bytes,
            "cuda_allocated_bytes": torch.cuda.memory_allocated(self.device) if cuda else 0,
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(self.device) if cuda else 0,
        }

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
        if self.device.type == "cuda":
            sam_px, resized = sam_pixels(image, cfg.sam_image_size, self.device)
        else:
            px, resized = sam_preprocess(image, cfg.sam_image_size)
            sam_px = px[None].to(self.device)
        sam_emb = self._encode_sam(sam_px.to(self.dtype))
        # CLIP's host-side resize runs while the GPU is busy with SAM (launches are async), so
        # the "sam" timing includes it and "clip" is the CLIP forward alone.
        clip_px = clip_preprocess(image, cfg.vision_image_size)
        t1 = self._now()
        feats = self._encode_clip(clip_px[None].to(self.device, self.dtype))
        t2 = self._now()
        prefix_ids = list(self._prefix_ids)
        ids = torch.tensor([prefix_ids], device=self.device)
        cache = self._prefill(m.embed(ids, feats))
        t3 = self._now()
        self.stats.sam_encodes += 1
        self.stats.clip_encodes += 1
        self.stats.prefills += 1
        t.update(sam=(t1 - t0) * 1e3, clip=(t2 - t1) * 1e3, prefill=(t3 - t2) * 1e3)
        frame = FrameFeatures(image.shape[:2], resized, feats, sam_emb, prefix_ids, cache)
        frame.nbytes = tensor_bytes(sam_emb) + tensor_bytes(feats) + tensor_bytes(cache)
        self._remember(key, frame)
        return frame, False

    def _remember(self, key: Hashable | None, frame: FrameFeatures) -> None:
        """Cache ``frame``, then evict oldest-first beyond ``cache_frames`` / ``cache_bytes``
        (a frame larger than ``cache_bytes`` on its own is not kept)."""
        if key is None or self.cache_frames == 0:
            return
        self._frames[key] = frame
        self._frames.move_to_end(key)
        limit = self.cache_bytes
        while self._frames and (
            len(self._frames) > self.cache_frames
            or (limit is not None and self.cache_memory_bytes > limit)
        ):
            self._frames.popitem(last=False)
            self.stats.evictions += 1

    def _prefill(self, embeds: torch.Tensor) -> object:
        """1×P×H prefix embeddings → the frame's prefix KV (see ``FrameFeatures.cache``)."""
        static = self._static
        if static is not None:
            static.resident = None  # the prefix region is being overwritten
            static.crop(0)
            static.forward_embeds(embeds[0], exact=True)
            prefix = static.save_prefix(static.length)
            static.resident = prefix  # the buffer holds exactly this prefix now
            return prefix
        _, cache = self.model.run_language(embeds, use_cache=True)
        return cache

    def _state(self, frame: FrameFeatures, needed: int) -> LanguageState:
        """A language state holding the frame's prefix, with room for ``needed`` positions."""
        m = self.model
        if isinstance(frame.cache, torch.Tensor):
            static = self._static
            if static is not None and needed <= static.capacity:
                static.load_prefix(frame.cache)
                return static
            # Longer than the static cache was sized for (rare): rebuild a dynamic prefix.
            self.stats.extra["static_overflows"] = self.stats.extra.get("static_overflows", 0) + 1
            ids = torch.tensor([frame.prefix_ids], device=self.device)
            _, cache = m.run_language(m.embed(ids, frame.image_features), use_cache=True)
            return DynamicState(m, cache)
        return DynamicState(m, frame.cache)

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
        conv = encode_conversation(self.tokenizer, self.config, expressions, with_answer=True)
        if conv.ids[: frame.prefix_len] != frame.prefix_ids:
            raise RuntimeError("prompt prefix differs from the cached frame prefix")
        t_dec = self._now()
        needed = len(conv.ids)
        if decoding == "generate":
            needed = max(needed, conv.prompt_len + self.max_new_tokens + 1)
        state = self._state(frame, needed)
        passes: dict[str, int] = {}
        try:
            try:
                slots, response, note, fallback = self._decode(
                    state, frame, conv, expressions, decoding, passes
                )
            except CapacityError:  # static cache too small after all: answer eagerly
                state.crop(frame.prefix_len)
                state = self._state(frame, self._static.capacity + 1 if self._static else 0)
                slots, response, note, fallback = self._decode(
                    state, frame, conv, expressions, decoding, passes
                )
        finally:
            state.crop(frame.prefix_len)
        if fallback:
            decoding = "slots"
        self.stats.slot_passes += passes.get("passes", 0)
        t_masks = self._now()
        targets = self._targets(frame, expressions, slots, masks_for_rejected)
        emptied = [t.phrase for t, s in zip(targets, slots, strict=True) if s.present
                   and not t.present]
        if emptied:
            said = "; ".join(f"'{p}'" for p in emptied)
            note = (note + "; " if note else "") + (
                f"answered [SEG] but no object of at least {self.min_object_area} px in the "
                f"mask, reported absent: {said}"
            )
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
            fallback=fallback,
            frame_cached=cached,
            timings_ms=t,
        )

    def _decode(self, state: LanguageState, frame: FrameFeatures, conv, expressions: list[str],
                decoding: str, passes: dict[str, int]):
        """→ (slots, response text, note, fallback reason: empty unless generate fell back)."""
        m, p = self.model, frame.prefix_len
        threshold = check_presence_threshold(self.presence_threshold)
        note = fallback = ""
        if decoding == "generate":
            prompt_ids = conv.ids[: conv.prompt_len]
            gen = generate(m, prompt_ids, p, state, self.generate_budget(conv),
                           self.min_new_tokens, stop_after_slots=len(expressions),
                           presence_threshold=threshold)
            response = self.tokenizer.decode(gen.token_ids, skip_special_tokens=False).strip()
            slots = gen.slots
            if len(slots) != len(expressions):
                fallback = FALLBACK_SLOT_COUNT
                note = (
                    f"generate produced {len(slots)} slot(s) for {len(expressions)} "
                    f"expression(s); answered with slot decoding instead"
                )
            elif self.check_generated_phrases and (bad := miscopied_slots(response, expressions)):
                i, written = bad[0]
                written = written if len(written) <= 80 else written[:79] + "…"
                more = f" (and {len(bad) - 1} more slot(s))" if len(bad) > 1 else ""
                fallback = FALLBACK_MISCOPIED
                note = (
                    f"generate wrote {written!r} for {expressions[i]!r}{more}; answered with "
                    f"slot decoding instead"
                )
            else:
                return slots, response, note, fallback
            state.crop(p)
        decode = decode_slots_speculative if self.slot_decoding == "speculative" else decode_slots
        slots = decode(m, conv.ids, conv.slot_positions, p, state, stats=passes,
                       presence_threshold=threshold)
        return slots, answer_text(expressions, [s.present for s in slots]), note, fallback

    def generate_budget(self, conv) -> int:
        """Most tokens ``generate`` may produce for ``conv`` (its skeleton answer incl. EOS)."""
        expected = len(conv.ids) - conv.prompt_len
        return max(self.min_new_tokens, min(self.max_new_tokens, expected + GENERATE_MARGIN))

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
            hidden = torch.stack([slots[i].hidden for i in want])  # n×H
            low_res = self._mask_logits(hidden, frame.sam_embedding)  # n×1×4h×4w
            logits = m.postprocess_masks(low_res, frame.resized, frame.image_size)
            binary = (logits >= 0).cpu().numpy()  # GSVA's eval threshold: logit >= 0
            masks = {i: binary[j] for j, i in enumerate(want)}
        targets = []
        for i, (phrase, s) in enumerate(zip(expressions, slots, strict=True)):
            if s.present:
                labels, boxes = label_objects(masks[i], self.instance_split, self.min_object_area)
                if boxes or not self.reject_empty_masks:
                    targets.append(Target(phrase, True, s.score, labels, boxes))
                    continue
                # "Present" with nothing to grasp helps no planner; for a model that follows
                # the phrase, an empty mask is also evidence that the target is not there.
                forced = masks[i] if masks_for_rejected else None
                targets.append(Target(phrase, False, 1.0 - s.score, forced_mask=forced))
            else:
                targets.append(Target(phrase, False, s.score, forced_mask=masks.get(i)))
        return targets


def _check_quantize_available(mode: str, device: torch.device) -> None:
    """Fail before loading a model when ``quantize`` cannot work (clear, actionable message)."""
    import importlib.util

    from gsva_ros.model.gsva import QuantizationError

    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(
            f"quantize={mode} needs bitsandbytes, which is not installed; install it with "
            f"`pip install bitsandbytes==0.50.2` (CUDA GPU needed for useful speed), or use "
            f"quantize=none"
        )
    if device.type != "cuda":
        log.warning(
            "quantize=%s on %s: bitsandbytes' CPU kernels are for smoke tests only (slow, "
            "no memory benefit that matters); use a CUDA device", mode, device
        )
