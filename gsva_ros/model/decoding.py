"""Answer decoding on top of a prefilled KV cache (GSVA ships none; spec §1.4 and §1.10).

``slots`` (default): constrained slot decoding. The answer skeleton ``Sure, they are e1:·, e2:·.``
is forced; at each slot the next-token logits choose ``[SEG]`` or ``[REJ]`` (score = softmax of
those two logits; ``[SEG]`` when its share reaches ``presence_threshold``, 0.5 = the larger
logit wins, as GSVA). The hidden state that predicted the slot is the mask embedding (position
p − 1). Two exact implementations:

- :func:`decode_slots` (reference, incremental): each chunk of forced text up to the next slot
  is fed once through the cache, with the previous choice prepended: N forward calls for N
  slots.
- :func:`decode_slots_speculative`: one forward over the whole skeleton with ``[SEG]`` in every
  slot. A causal model's state at slot k depends only on the tokens before it, so every
  decision up to and including the first ``[REJ]`` is exactly the incremental one; only then is
  the cache rolled back to that slot and the rest re-run with ``[REJ]`` substituted. Typical
  commands (targets present) need one pass instead of N; the worst case (every slot but the
  last ``[REJ]``) needs N, like the reference. Results equal the reference up to
  floating-point reassociation (different chunk shapes), which tests bound at 1e-5.

``generate``: greedy free generation until ``</s>``; slots are parsed in order and the hidden
state that produced each ``[SEG]`` is kept, so no extra forward pass is needed.

Both work on any :class:`LanguageState`: :class:`DynamicState` wraps a transformers cache (the
eager path), :class:`StaticLM` is a preallocated KV buffer with a fixed-shape forward that can
be captured in CUDA graphs or compiled (the fast path, see its docstring).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gsva_ros.model.gsva import GSVAModel

log = logging.getLogger(__name__)


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


# ============================================================================ language states
class LanguageState:
    """A KV cache the decoders extend: ``forward(ids)`` feeds tokens, ``crop`` rolls back."""

    model: GSVAModel

    @property
    def length(self) -> int:  # number of positions held
        raise NotImplementedError

    def forward(self, ids: Sequence[int]) -> torch.Tensor:
        """Feed ``ids`` (T tokens, no image sentinels) → post-norm hidden states T×H."""
        raise NotImplementedError

    def crop(self, length: int) -> None:
        """Forget every position ≥ ``length``."""
        raise NotImplementedError


class DynamicState(LanguageState):
    """A transformers ``Cache`` (``DynamicCache``) driven through ``GSVAModel.run_language``."""

    def __init__(self, model: GSVAModel, cache) -> None:
        self.model, self.cache = model, cache

    @property
    def length(self) -> int:
        return int(self.cache.get_seq_length())

    def forward(self, ids: Sequence[int]) -> torch.Tensor:
        t = torch.tensor([list(ids)], device=self.model.device)
        hidden, _ = self.model.run_language(
            self.model.embed(t, None), past_key_values=self.cache, use_cache=True
        )
        return hidden[0]

    def crop(self, length: int) -> None:
        extra = self.length - length
        if extra > 0:
            self.cache.crop(-extra)


def as_state(model: GSVAModel, cache) -> LanguageState:
    return cache if isinstance(cache, LanguageState) else DynamicState(model, cache)


def _step(model: GSVAModel, ids: list[int], cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed ids through the cache → (hidden T×H, logits of the last position V)."""
    hidden = as_state(model, cache).forward(ids)
    return hidden, model.lm_head(hidden[-1]).float()


def _decide(
    model: GSVAModel,
    logits: torch.Tensor,
    hidden: torch.Tensor,
    choice: int | None,
    threshold: float = 0.5,
) -> SlotDecision:
    seg, rej = model.config.seg_token_id, model.config.rej_token_id
    two = torch.softmax(torch.stack([logits[seg], logits[rej]]), dim=0)
    if choice is not None:
        present = choice == seg
    elif threshold == 0.5:
        present = bool(two[0] >= two[1])  # exactly GSVA's rule, no rounding at the boundary
    else:
        present = bool(two[0] >= threshold)
    token = seg if present else rej
    return SlotDecision(
        present=present,
        score=float(two[0] if present else two[1]),
        argmax_is_slot=int(logits.argmax()) == token,
        hidden=hidden,
    )


def _count(stats: dict[str, int] | None, key: str, n: int = 1) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + n


# ============================================================================ slot decoding
@torch.inference_mode()
def decode_slots(
    model: GSVAModel,
    ids: list[int],
    slot_positions: list[int],
    start: int,
    cache,
    stats: dict[str, int] | None = None,
    presence_threshold: float = 0.5,
) -> list[SlotDecision]:
    """Constrained slot decoding of the skeleton ``ids`` (``[SEG]`` at every slot).

    ``cache`` (a transformers cache or a :class:`LanguageState`) already holds ``ids[:start]``;
    it is extended in place to ``slot_positions[-1]`` positions (the caller crops it).
    """
    state = as_state(model, cache)
    decisions: list[SlotDecision] = []
    pending: list[int] = []  # the slot token chosen last, fed with the next chunk
    pos = start
    for slot in slot_positions:
        hidden, logits = _step(model, pending + ids[pos:slot], state)
        _count(stats, "passes")
        d = _decide(model, logits, hidden[-1], None, presence_threshold)
        decisions.append(d)
        pending = [model.config.seg_token_id if d.present else model.config.rej_token_id]
        pos = slot + 1
    return decisions


@torch.inference_mode()
def decode_slots_speculative(
    model: GSVAModel,
    ids: list[int],
    slot_positions: list[int],
    start: int,
    cache,
    stats: dict[str, int] | None = None,
    presence_threshold: float = 0.5,
) -> list[SlotDecision]:
    """Same contract and results as :func:`decode_slots`, in 1 + (#[REJ] before the last slot)
    forward passes instead of N (see the module docstring for why it is exact).

    ``stats["passes"]`` counts forward passes when a dict is given.
    """
    if not slot_positions:
        return []
    state = as_state(model, cache)
    cfg = model.config
    work = list(ids)  # the skeleton with the choices made so far substituted
    last = slot_positions[-1]
    decisions: list[SlotDecision] = []
    fed = start  # the cache holds work[:fed]
    k = 0
    while k < len(slot_positions):
        # One pass over everything up to the last slot; [SEG] is assumed at undecided slots.
        hidden = state.forward(work[fed:last])  # (last − fed)×H
        _count(stats, "passes")
        first = k
        rows = torch.tensor([p - 1 - fed for p in slot_positions[first:]], device=hidden.device)
        slot_hidden = hidden.index_select(0, rows)  # n_left×H (a copy: hidden may be reused)
        logits = model.lm_head(slot_hidden).float()  # n_left×V, one GEMM for all slots
        for j in range(first, len(slot_positions)):
            d = _decide(model, logits[j - first], slot_hidden[j - first], None, presence_threshold)
            decisions.append(d)
            k = j + 1
            if not d.present and k < len(slot_positions):
                # Everything after slot j was computed with [SEG] there: roll back and re-run.
                slot = slot_positions[j]
                work[slot] = cfg.rej_token_id
                state.crop(slot)
                fed = slot
                break
    return decisions


# ============================================================================ generation
@dataclass
class Generation:
    token_ids: list[int]  # generated ids, EOS excluded
    slots: list[SlotDecision]
    finished: bool  # True when EOS (or the last expected slot) came before max_new_tokens


@torch.inference_mode()
def generate(
    model: GSVAModel,
    ids: list[int],
    start: int,
    cache,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    stop_after_slots: int | None = None,
    presence_threshold: float = 0.5,
) -> Generation:
    """Greedy generation after the prompt ``ids`` (``cache`` holds ``ids[:start]``).

    ``min_new_tokens`` forbids ``</s>`` before that many tokens (benchmarks use it to make
    random-weight runs produce a fixed number of tokens; 0 = plain greedy decoding).
    ``stop_after_slots``: stop as soon as that many ``[SEG]``/``[REJ]`` tokens are out (every
    expression has its answer; a small model that keeps talking would otherwise add slots for
    phrases nobody asked about). When greedy picks ``[SEG]`` or ``[REJ]``, the two-way choice
    between them follows ``presence_threshold``, as in slot decoding.
    """
    cfg = model.config
    state = as_state(model, cache)
    hidden, logits = _step(model, ids[start:], state)
    last_hidden = hidden[-1]
    out: list[int] = []
    slots: list[SlotDecision] = []
    for _ in range(max_new_tokens):
        if len(out) < min_new_tokens:
            logits[cfg.eos_token_id] = float("-inf")
        token = int(logits.argmax())
        if token == cfg.eos_token_id:
            return Generation(out, slots, True)
        if token in (cfg.seg_token_id, cfg.rej_token_id):
            d = _decide(model, logits, last_hidden, None, presence_threshold)
            token = cfg.seg_token_id if d.present else cfg.rej_token_id
            slots.append(d)
        out.append(token)
        if stop_after_slots is not None and len(slots) >= stop_after_slots >= 1:
            if len(out) >= min_new_tokens:
                return Generation(out, slots, True)
        hidden, logits = _step(model, [token], state)
        last_hidden = hidden[-1]
    return Generation(out, slots, False)


# ============================================================================ CUDA graphs
class CapturedCall:
    """``fn(*inputs) -> Tensor`` captured once in a CUDA graph for fixed input shapes.

    Calling copies the new inputs into the static input buffers (skipped when the caller
    passes the buffers themselves) and replays the graph. The returned tensor is the graph's
    static output: it is overwritten by the next replay of this graph, and of any graph that
    shares its memory ``pool``, so callers consume or clone it at once.
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        static_inputs: Sequence[torch.Tensor],
        pool=None,
        warmup: int = 2,
    ) -> None:
        self.fn = fn
        self.inputs = list(static_inputs)  # owned by the caller or by this object; never freed
        # Warm-up on a side stream (cuBLAS workspaces and lazy initialisations happen outside
        # the capture), as the CUDA graph documentation requires.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for buf, x in zip(self.inputs, inputs, strict=True):
            if x is not buf:
                buf.copy_(x)
        self.graph.replay()
        return self.output


# ============================================================================ static KV cache
STATIC_MODES = ("eager", "graphs", "inductor")
DEFAULT_BUCKETS = (1, 8, 16, 32, 64, 128)


class CapacityError(RuntimeError):
    """The static cache has no room for the requested tokens (callers fall back to eager)."""


class StaticLM(LanguageState):
    """Preallocated KV cache plus a fixed-shape LLaMA forward over ``model``'s own modules.

    Why not transformers' forward: its mask construction and cache bookkeeping make host-side
    decisions from tensor values, which cannot be captured in a CUDA graph, and dynamic-shape
    caches reallocate every step. Here every forward of T tokens starting at position s

    - writes its keys/values into ``kv[layer, 0|1, 0, :, s:s+T]`` with ``index_copy_``;
    - attends over the whole buffer with a boolean mask ``key_pos <= query_pos`` built on the
      device from the start-position tensor, so stale or padded entries beyond the current
      length are never seen by a real token;
    - has static shapes when T is padded to a bucket (``graphs``/``inductor`` modes), so one
      captured graph per bucket serves every command. Padded tokens sit after the real ones:
      causality keeps them invisible to real queries, and their cache writes are overwritten
      before any real query can reach those positions.

    ``mode``: ``eager`` (exact T unless ``pad``: the reference for tests), ``graphs`` (CUDA:
    one :class:`CapturedCall` per bucket, captured lazily or by :meth:`prepare`), ``inductor``
    (``torch.compile`` of the forward, one compilation per bucket; works on CPU).

    Buffer: ``kv`` is n_layers×2×1×n_kv×(capacity + max bucket)×head_dim. Only linear layers
    are called through their modules, so bitsandbytes-quantised layers work too.
    """

    def __init__(
        self,
        model: GSVAModel,
        capacity: int,
        mode: str = "eager",
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        pad: bool | None = None,
    ) -> None:
        if mode not in STATIC_MODES:
            raise ValueError(f"static mode must be one of {STATIC_MODES}, got {mode!r}")
        if mode == "graphs" and model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        lm = model.language_model
        cfg = lm.config
        self.model = model
        self.mode = mode
        # Padding to buckets gives static shapes; eager mode can pad too (tests use it to
        # check the padding logic of the graph path on CPU).
        self.pad = mode != "eager" if pad is None else pad
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.capacity = int(capacity)
        slack = self.buckets[-1]
        total = self.capacity + slack
        dev, dt = model.device, model.dtype
        self.kv = torch.zeros(
            len(lm.layers), 2, 1, self.n_kv, total, self.head_dim, device=dev, dtype=dt
        )
        self.key_pos = torch.arange(total, device=dev)
        self.offsets = torch.arange(total, device=dev)
        self.start = torch.zeros(1, dtype=torch.long, device=dev)  # static graph input
        rot = lm.rotary_emb
        self.inv_freq = rot.inv_freq.to(device=dev, dtype=torch.float32)
        self.rope_scaling = float(getattr(rot, "attention_scaling", 1.0))
        self._length = 0
        self.resident: object | None = None  # identity of the prefix held in kv[..., :P, :]
        self._graphs: dict[int, CapturedCall] = {}
        self._pool = torch.cuda.graph_pool_handle() if mode == "graphs" else None
        self._compiled: Callable | None = None
        if mode == "inductor":
            self._compiled = torch.compile(self._forward_impl, dynamic=False)
        self.fallbacks: list[str] = []

    # ------------------------------------------------------------------ state protocol
    @property
    def length(self) -> int:
        return self._length

    def crop(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot crop a cache of {self._length} positions to {length}")
        self._length = length

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @torch.inference_mode()
    def forward(self, ids: Sequence[int]) -> torch.Tensor:
        t = torch.tensor(list(ids), device=self.model.device)
        return self.forward_embeds(self.model.language_model.embed_tokens(t))

    @torch.inference_mode()
    def forward_embeds(self, embeds: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """Feed T×H input embeddings at the current length → hidden T×H (a fresh tensor).

        ``exact`` runs (and captures) exactly T positions instead of padding to a bucket: the
        image prefix has the same length on every frame, so it gets its own graph.
        """
        n = embeds.shape[0]
        if self._length + n > self.capacity:
            raise CapacityError(
                f"static KV cache holds {self.capacity} positions; {self._length} used, "
                f"{n} more requested"
            )
        outs = []
        done = 0
        while done < n:
            if not self.pad or exact:
                size = take = n - done
            else:
                take = min(n - done, self.buckets[-1])
                size = next(b for b in self.buckets if b >= take)
            chunk = embeds[done : done + take]
            if size > take:
                chunk = torch.cat([chunk, chunk.new_zeros(size - take, chunk.shape[1])])
            self.start.fill_(self._length)
            out = self._run(chunk.unsqueeze(0), size)
            outs.append(out[0, :take].clone())  # graph outputs are reused by the next replay
            self._length += take
            done += take
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    # ------------------------------------------------------------------ prefix handling
    def save_prefix(self, length: int) -> torch.Tensor:
        """A copy of positions [0, length): n_layers×2×1×n_kv×length×head_dim."""
        return self.kv[..., :length, :].clone()

    def load_prefix(self, prefix: torch.Tensor) -> None:
        """Make ``prefix`` (from :meth:`save_prefix`) the cache content; free when resident."""
        length = prefix.shape[-2]
        if self.resident is not prefix:
            self.kv[..., :length, :].copy_(prefix)
            self.resident = prefix
        self._length = length

    # ------------------------------------------------------------------ execution
    @torch.inference_mode()
    def prepare(self, sizes: Sequence[int] | None = None) -> None:
        """Capture / compile the given padded sizes now (all buckets by default).

        The warm-up runs write at the start of the buffer, so the cache is emptied.
        """
        if self.mode == "eager":
            return
        self.resident = None
        hidden = self.model.config.hidden_size
        for size in sizes or self.buckets:
            self.start.fill_(0)
            x = torch.zeros(1, size, hidden, device=self.kv.device, dtype=self.kv.dtype)
            self._run(x, size)
        self._length = 0

    def _run(self, embeds: torch.Tensor, size: int) -> torch.Tensor:
        if self.mode == "graphs":
            graph = self._graphs.get(size)
            if graph is None:
                try:
                    graph = CapturedCall(
                        self._forward_impl, [embeds.clone(), self.start], pool=self._pool
                    )
                except Exception as exc:  # noqa: BLE001 - any capture failure → eager
                    return self._fallback(f"CUDA graph capture of {size} tokens failed", exc,
                                          embeds)
                self._graphs[size] = graph
            return graph(embeds, self.start)
        if self._compiled is not None:
            try:
                return self._compiled(embeds, self.start)
            except Exception as exc:  # noqa: BLE001 - compiler missing/failing → eager
                return self._fallback("torch.compile of the language model failed", exc, embeds)
        return self._forward_impl(embeds, self.start)

    def _fallback(self, what: str, exc: Exception, embeds: torch.Tensor) -> torch.Tensor:
        msg = f"{what}: {type(exc).__name__}: {exc}; running the static cache eagerly"
        log.warning(msg)
        self.fallbacks.append(msg)
        self.mode, self._compiled, self._graphs = "eager", None, {}
        if embeds.is_cuda:
            torch.cuda.synchronize(embeds.device)
        return self._forward_impl(embeds, self.start)

    def _forward_impl(self, embeds: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """embeds 1×T×H at positions start + [0, T) → post-norm hidden 1×T×H (pure tensor ops)."""
        lm = self.model.language_model
        t = embeds.shape[1]
        pos = start + self.offsets[:t]  # T
        freqs = pos.to(torch.float32)[:, None] * self.inv_freq[None, :]  # T×hd/2
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(embeds.dtype)  # T×hd
        sin = (emb.sin() * self.rope_scaling).to(embeds.dtype)
        mask = (self.key_pos[None, :] <= pos[:, None])[None, None]  # 1×1×T×total
        gqa = {"enable_gqa": True} if self.n_kv != self.n_heads else {}
        x = embeds
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, t, self.n_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, t, self.n_kv, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = self.kv[i, 0], self.kv[i, 1]  # 1×n_kv×total×hd views
            keys.index_copy_(2, pos, k)
            values.index_copy_(2, pos, v)
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=attn.scaling, **gqa
            )
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, t, self.n_heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return lm.norm(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's pairing of dimension i with i + d/2 (LLaMA's convention)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
