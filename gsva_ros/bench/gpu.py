"""``gsva-ros bench gpu``: our engine vs the plain pipeline, same run, random full-size weights.

Steps (each printed as it finishes):

1. the plain pipeline (:func:`gsva_ros.bench.plain.measure_plain`), then freed;
2. a random-weight GSVA of the requested geometry, initialised directly in bf16 on the GPU
   (seconds; a CPU init of 7B parameters would take minutes), behind :class:`GSVAEngine` with
   its defaults for CUDA (CUDA graphs, static KV cache, SDPA in SAM, speculative slots);
   ``warmup()`` is timed;
3. per-step device times (SAM, CLIP, prefix prefill, one decode step, mask decoder for 3
   prompts) and end-to-end command latencies: slots on a fresh / cached frame, best case
   (every slot [SEG]: one language pass) and worst case (every slot [REJ]: N passes), and
   ``generate`` of exactly 20 tokens. Random weights make answers meaningless, so decisions
   and generated tokens are forced through a wrapped ``lm_head`` that still computes the real
   logits (:func:`gsva_ros.bench.common.install_forced_head`);
4. the same end-to-end commands through the eager engine (no graphs, no static cache);
5. optionally (``--quantize``) int8/NF4 LLM weights, when bitsandbytes imports.

Results: printed tables, a JSON file in ``--out``, and a markdown section in
``docs/benchmarks.md`` (a copy is written to ``--out`` too, since only that folder comes
back from the GPU machine; ``--from-json`` re-renders the docs section from a JSON file).
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gsva_ros.bench.common import (
    BENCH_COMMAND,
    COMMANDS,
    environment,
    fmt_ms,
    generate_script,
    install_forced_head,
    markdown_table,
    random_images,
    summarize,
    table,
    time_device,
    time_wall,
    update_markdown_section,
)
from gsva_ros.bench.plain import NEW_TOKENS, _geometry, measure_plain

TARGETS_MS = {"slots_fresh": 40.0, "slots_cached": 15.0, "generate20_fresh": 150.0}
IMAGE_HW = (480, 640)  # a VGA camera frame


def build_random_gsva(geometry: str, device: str, dtype=None):
    """Random-weight ``GSVAModel`` of a geometry + a small BPE tokenizer → (model, tokenizer).

    The tokenizer is the project's own (trained on the prompt template in a second), so the
    prompt has about as many tokens as with LLaMA's; the model keeps the geometry's
    vocabulary size (embedding and lm_head cost) and takes the special-token ids from it.
    """
    import torch

    from gsva_ros.model.gsva import GSVAModel
    from gsva_ros.model.tokenizer import build_tiny_tokenizer, token_ids

    cfg = _geometry(geometry)
    tok = build_tiny_tokenizer(list(COMMANDS), vocab_size=min(1024, cfg.vocab_size))
    for key, value in token_ids(tok).items():
        setattr(cfg, key, value)
    dev = torch.device(device)
    dt = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dt)
    try:
        with torch.device(dev):
            model = GSVAModel(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    return model, tok


def _filler_token(tokenizer) -> int:
    ids = tokenizer(" the", add_special_tokens=False)["input_ids"]
    return int(ids[0])


def measure_engine(
    model,
    tokenizer,
    device: str,
    reps: int,
    compile: bool | str = "auto",
    sam_attention: str = "auto",
    steps: bool = True,
    quantize: str = "none",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """End-to-end (and with ``steps`` per-step) latencies of one engine configuration."""
    import torch

    from gsva_ros.engine import GSVAEngine, sam_pixels
    from gsva_ros.model.preprocess import clip_preprocess, sam_preprocess

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    engine = GSVAEngine(
        model, tokenizer=tokenizer, device=device, dtype="auto", compile=compile,
        sam_attention=sam_attention, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        quantize=quantize,
        # the forced script writes filler, not the phrases: timing, not answers, is measured
        check_generated_phrases=False,
    )
    m, cfg = engine.model, engine.config
    head = install_forced_head(m)
    seg, rej = cfg.seg_token_id, cfg.rej_token_id
    n_slots = 3  # BENCH_COMMAND has three expressions
    script = generate_script(cfg, n_slots, NEW_TOKENS, _filler_token(tokenizer))
    res: dict[str, Any] = {
        "compile_mode": engine.compile_mode,
        "static_cache": engine._static is not None,
        "sam_attention": m.sam_attention,
        "quantize": quantize,
    }
    head.force(seg)
    res["warmup_s"] = round(engine.warmup()["warmup_s"], 2)
    log(f"  warm-up {res['warmup_s']} s ({res['compile_mode']}, static={res['static_cache']})")
    images = random_images(2 * reps + 4, *IMAGE_HW, seed=1)
    conv_lens = _prompt_lengths(engine)
    res.update(conv_lens)

    with torch.inference_mode():
        if steps:
            img = images[0]
            if cuda:
                sam_px, _ = sam_pixels(img, cfg.sam_image_size, dev)
            else:
                sam_px = sam_preprocess(img, cfg.sam_image_size)[0][None]
            sam_px = sam_px.to(dev, engine.dtype)
            clip_px = clip_preprocess(img, cfg.vision_image_size)[None].to(dev, engine.dtype)
            res["sam_encoder_ms"] = summarize(time_device(lambda: engine._encode_sam(sam_px),
                                                          reps))["p50"]
            res["clip_tower_ms"] = summarize(time_device(lambda: engine._encode_clip(clip_px),
                                                         reps))["p50"]
            feats = engine._encode_clip(clip_px)
            ids = torch.tensor([engine._prefix_ids], device=dev)
            embeds = m.embed(ids, feats)
            res["prefix_prefill_ms"] = summarize(time_device(lambda: engine._prefill(embeds),
                                                             reps))["p50"]
            engine.encode_frame(img, "bench-steps")
            frame = engine._frames["bench-steps"]
            state = engine._state(frame, frame.prefix_len + 64)
            filler = script[0]

            def one_token():  # what generate does per token: forward, lm_head, argmax to host
                hidden = state.forward([filler])
                int(m.lm_head(hidden[-1]).float().argmax())
                state.crop(frame.prefix_len)

            head.force(None)
            res["decode_ms_per_token"] = summarize(time_device(one_token, reps))["p50"]
            hidden3 = torch.randn(n_slots, cfg.hidden_size, device=dev, dtype=engine.dtype)
            res["mask_decoder_3_ms"] = summarize(time_device(
                lambda: engine._mask_logits(hidden3, frame.sam_embedding), reps))["p50"]
            engine.clear_cache()

        counter = iter(range(10**9))

        def command(decoding: str, key: str | None) -> Callable[[], None]:
            """One command; ``key=None``: a new frame each call (fresh), else that frame."""
            def run() -> None:
                i = next(counter)
                if decoding == "generate":
                    head.force(script=script)  # exactly 20 tokens, 3 [SEG]: no fallback
                image = images[0] if key is not None else images[i % len(images)]
                r = engine.segment(image, BENCH_COMMAND,
                                   frame_key=key if key is not None else ("fresh", i),
                                   decoding=decoding)
                if r.decoding != decoding:
                    res.setdefault("notes", []).append(r.note)
            return run

        for case, token in (("best", seg), ("worst", rej)):
            head.force(token)
            before = engine.stats.slot_passes
            fresh = time_wall(command("slots", None), reps)
            res[f"slots_fresh_{case}"] = summarize(fresh)
            engine.encode_frame(images[0], "bench-cached")
            cached = time_wall(command("slots", "bench-cached"), reps)
            res[f"slots_cached_{case}"] = summarize(cached)
            res[f"slot_passes_{case}"] = (engine.stats.slot_passes - before) / (2 * reps + 2)
        gen_reps = max(3, reps // 2)
        res["generate20_fresh"] = summarize(time_wall(command("generate", None), gen_reps))
        engine.encode_frame(images[0], "bench-cached")
        res["generate20_cached"] = summarize(time_wall(command("generate", "bench-cached"),
                                                       gen_reps))
    head.force(None)
    mem = engine.memory_report()
    res["memory"] = mem
    if cuda:
        res["max_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    res["warnings"] = list(engine.warnings)
    res["stats"] = {"commands": engine.stats.commands, "slot_passes": engine.stats.slot_passes}
    engine.close()
    return res


def _prompt_lengths(engine) -> dict[str, int]:
    from gsva_ros.model.prompt import encode_conversation
    from gsva_ros.model.text import split_command

    conv = encode_conversation(engine.tokenizer, engine.config, split_command(BENCH_COMMAND))
    return {
        "prefix_tokens": conv.prefix_len,
        "prompt_tokens": conv.prompt_len,
        "skeleton_tokens": len(conv.ids),
    }


def ratios(plain: dict[str, Any], ours: dict[str, Any]) -> dict[str, float]:
    """plain ÷ ours (speed-up) for every step both measured."""
    def r(a: float | None, b: float | None) -> float | None:
        if not isinstance(a, int | float) or not isinstance(b, int | float) or b <= 0:
            return None
        return round(a / b, 2)

    p, o = plain, ours
    llm_prefill = (p.get("prefill_ms", 0) - p.get("clip_tower_ms", 0)) if p else None
    return {
        "sam": r(p.get("sam_encoder_ms"), o.get("sam_encoder_ms")),
        "clip": r(p.get("clip_tower_ms"), o.get("clip_tower_ms")),
        "prefill": r(llm_prefill, o.get("prefix_prefill_ms")),
        "decode_per_token": r(p.get("decode_ms_per_token"), o.get("decode_ms_per_token")),
        "mask_decoder_3": r(p.get("mask_decoder_3_seq_ms"), o.get("mask_decoder_3_ms")),
        "slots_fresh": r(p.get("plain_command_ms"), o["slots_fresh_best"]["p50"]),
        "slots_cached": r(p.get("cached_second_command_ms"), o["slots_cached_best"]["p50"]),
        "generate20_fresh": r(p.get("plain_command_ms"), o["generate20_fresh"]["p50"]),
        "generate20_cached": r(p.get("cached_second_command_ms"), o["generate20_cached"]["p50"]),
    }


def step_rows(result: dict[str, Any]) -> list[list[str]]:
    """Rows (step, plain ms, ours ms, eager engine ms, speed-up) for tables and markdown."""
    p, o = result.get("plain") or {}, result["engine"]
    e = result.get("engine_eager") or {}
    rat = result.get("ratios", {})
    llm_prefill = (p["prefill_ms"] - p["clip_tower_ms"]) if "prefill_ms" in p else None

    def x(v):
        return "—" if v is None else f"{v:.1f}×"

    def e2e(d, key):
        return d[key]["p50"] if key in d else None

    rows = [
        ["SAM image encoder", p.get("sam_encoder_ms"), o.get("sam_encoder_ms"), None, "sam"],
        ["CLIP + projector", p.get("clip_tower_ms"), o.get("clip_tower_ms"), None, "clip"],
        ["prefill of the image prefix (LLM)", llm_prefill, o.get("prefix_prefill_ms"), None,
         "prefill"],
        ["one decode step", p.get("decode_ms_per_token"), o.get("decode_ms_per_token"), None,
         "decode_per_token"],
        ["mask decoder, 3 prompts", p.get("mask_decoder_3_seq_ms"), o.get("mask_decoder_3_ms"),
         None, "mask_decoder_3"],
        ["slots, fresh frame (best: all [SEG])", p.get("plain_command_ms"),
         e2e(o, "slots_fresh_best"), e2e(e, "slots_fresh_best"), "slots_fresh"],
        ["slots, fresh frame (worst: all [REJ])", None, e2e(o, "slots_fresh_worst"),
         e2e(e, "slots_fresh_worst"), None],
        ["slots, cached frame (best)", p.get("cached_second_command_ms"),
         e2e(o, "slots_cached_best"), e2e(e, "slots_cached_best"), "slots_cached"],
        ["slots, cached frame (worst)", None, e2e(o, "slots_cached_worst"),
         e2e(e, "slots_cached_worst"), None],
        ["generate 20 tokens, fresh frame", p.get("plain_command_ms"), e2e(o, "generate20_fresh"),
         e2e(e, "generate20_fresh"), "generate20_fresh"],
        ["generate 20 tokens, cached frame", p.get("cached_second_command_ms"),
         e2e(o, "generate20_cached"), e2e(e, "generate20_cached"), "generate20_cached"],
    ]
    return [[name, fmt_ms(a), fmt_ms(b), fmt_ms(c), x(rat.get(k)) if k else "—"]
            for name, a, b, c, k in rows]


HEADERS = ["step (p50, ms)", "plain", "engine", "engine eager", "speed-up"]


def markdown(result: dict[str, Any]) -> str:
    env, o = result["environment"], result["engine"]
    plain_mem = (result.get("plain") or {}).get("max_mem_gib", "—")
    lines = [
        f"### GPU, {result['geometry']} geometry — {env.get('gpu') or 'cpu'}",
        "",
        f"Measured {result['date']} with `{env.get('argv', '')}`: torch {env['torch']}, "
        f"transformers {env['transformers']}, CUDA {env.get('cuda') or '—'}, "
        f"segment_anything {env.get('segment_anything')}. Random weights, bf16, one 640×480 "
        f"frame, command {BENCH_COMMAND!r} (3 expressions). Prompt: {o['prefix_tokens']} "
        f"prefix + {o['prompt_tokens'] - o['prefix_tokens']} question tokens; skeleton "
        f"{o['skeleton_tokens']} tokens. \"plain\" = transformers generate + segment_anything, "
        f"measured in the same run (`plain` end-to-end rows are SAM + generate 20 + 3 decoder "
        f"calls, and cached text prefill + 19 tokens + 1 decoder call).",
        "",
        markdown_table(HEADERS, step_rows(result)),
        "",
        f"Engine: compile={o['compile_mode']}, static cache={o['static_cache']}, SAM attention="
        f"{o['sam_attention']}, warm-up {o['warmup_s']} s, language passes per slots command: "
        f"best {o['slot_passes_best']:.1f}, worst {o['slot_passes_worst']:.1f}; peak GPU memory "
        f"{o.get('max_mem_gib', '—')} GiB (plain: {plain_mem} GiB); frame cache "
        f"{o['memory']['cache_bytes'] / 2**20:.0f} MiB, static KV "
        f"{o['memory']['static_kv_bytes'] / 2**20:.0f} MiB.",
    ]
    t = result.get("targets", {})
    if t:
        lines += ["", "Targets (p50): " + "; ".join(
            f"{k} ≤ {v['target_ms']:.0f} ms: {fmt_ms(v['ms'])} ms {'✅' if v['met'] else '❌'}"
            for k, v in t.items())]
    if o.get("warnings"):
        lines += ["", "Fallbacks: " + "; ".join(o["warnings"])]
    q = result.get("quantized")
    if q:
        if "skipped" in q:
            lines += ["", f"Quantised LLM: skipped ({q['skipped']})."]
        else:
            lines += ["", f"Quantised LLM ({q['quantize']}): slots fresh "
                      f"{fmt_ms(q['slots_fresh_best']['p50'])} ms, cached "
                      f"{fmt_ms(q['slots_cached_best']['p50'])} ms, generate 20 cached "
                      f"{fmt_ms(q['generate20_cached']['p50'])} ms; peak "
                      f"{q.get('max_mem_gib', '—')} GiB."]
    return "\n".join(lines)


def run_gpu_bench(
    geometry: str = "7b",
    device: str = "cuda",
    reps: int = 10,
    out: str | Path = ".",
    docs: str | Path | None = "docs/benchmarks.md",
    plain: bool = True,
    eager: bool = True,
    quantize: str = "none",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run everything (see the module docstring) → the result dict (also written to disk)."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("bench gpu needs a CUDA GPU (for a CPU smoke test: --device cpu "
                           "--geometry tiny)")
    result: dict[str, Any] = {
        "geometry": geometry,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "environment": environment(),
    }
    log(f"environment: {json.dumps(result['environment'])}")
    if plain:
        log("plain pipeline (transformers generate + segment_anything) ...")
        result["plain"] = measure_plain(geometry, device, reps=reps)
        log("  " + ", ".join(f"{k}={v}" for k, v in result["plain"].items()))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    t = time.perf_counter()
    model, tok = build_random_gsva(geometry, device)
    result["build_model_s"] = round(time.perf_counter() - t, 1)
    log(f"random GSVA {geometry} built on {device} in {result['build_model_s']} s")
    log("engine (defaults for this device) ...")
    result["engine"] = measure_engine(model, tok, device, reps, log=log)
    if eager:
        log("engine, eager (compile off, segment_anything attention) ...")
        result["engine_eager"] = measure_engine(model, tok, device, reps, compile=False,
                                                sam_attention="reference", steps=False, log=log)
    if quantize != "none":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            result["quantized"] = {"skipped": f"bitsandbytes not importable: {exc}"}
        else:
            log(f"engine, {quantize} LLM weights ...")
            result["quantized"] = measure_engine(model, tok, device, reps, steps=False,
                                                 quantize=quantize, log=log)
    result["ratios"] = ratios(result.get("plain") or {}, result["engine"])
    measured = {"slots_fresh": "slots_fresh_best", "slots_cached": "slots_cached_best",
                "generate20_fresh": "generate20_fresh"}
    result["targets"] = {}
    for name, key in measured.items():
        ms = result["engine"][key]["p50"]
        result["targets"][name] = {"target_ms": TARGETS_MS[name], "ms": ms,
                                   "met": bool(ms <= TARGETS_MS[name])}
    write_outputs(result, out, docs, log)
    return result


def write_outputs(result: dict[str, Any], out: str | Path, docs: str | Path | None,
                  log: Callable[[str], None] = print) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"bench_gpu_{result['geometry']}"
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = markdown(result)
    (out_dir / f"{name}.md").write_text(md + "\n")
    if docs:
        update_markdown_section(docs, f"gpu-results-{result['geometry']}", md)
    log("\n" + table(HEADERS, step_rows(result)))
    log(f"\nwrote {out_dir / (name + '.json')}" + (f" and updated {docs}" if docs else ""))
