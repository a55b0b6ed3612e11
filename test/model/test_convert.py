"""``convert_official`` on a synthetic "official" GSVA checkpoint with the released key layout.

A tiny ``GSVAModel`` is written out the way the released files are laid out (``gsva_reference``
§3.2): a PEFT-wrapped ``.bin`` (``base_model.model.`` prefix, unmerged LoRA on every q/v
projection), a LLaVA folder (LLaMA HF ``config.json``, a base tokenizer *without* GSVA's
tokens, sharded safetensors with an index), an HF CLIP folder and a SAM ``.pth``. Some parts are
left out of the ``.bin`` on purpose so that every fill path is used, and the base copies of
parts the ``.bin`` does hold are perturbed so that taking the wrong source shows up.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gsva_ros.model.checkpoint import load_checkpoint
from gsva_ros.model.config import gsva_7b, gsva_13b, tiny
from gsva_ros.model.convert import (
    ConversionError,
    convert_official,
    expected_token_ids,
    merge_lora,
)
from gsva_ros.model.gsva import GSVAModel
from gsva_ros.model.tokenizer import build_tiny_tokenizer, token_ids

PEFT = "base_model.model."
LM = "llava.model.language_model."
R, ALPHA = 4, 16.0
CORPUS = ["the red circle", "all blue squares on the left", "the purple star"]
GSVA_TOKENS = ("[SEG]", "[REJ]", "<im_start>", "<im_end>")
# LLaMA keys the synthetic .bin leaves out: they must come from the LLaVA folder.
FROM_LLAVA = (
    LM + "norm.weight",
    LM + "layers.1.mlp.up_proj.weight",
    LM + "layers.1.mlp.down_proj.weight",
)


def official_name(key: str, vt: str) -> str:
    """Our key → the official (un-prefixed) name; written independently of the converter."""
    table = (
        (LM, "model."),
        ("llava.lm_head.", "lm_head."),
        ("llava.model.multi_modal_projector.linear.", "model.mm_projector."),
        (vt, "model.vision_tower.vision_tower.vision_model."),
        ("visual_model.", "model.visual_model."),
        ("text_hidden_fcs.", "model.text_hidden_fcs."),
    )
    for ours, theirs in table:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise AssertionError(key)


def strip_gsva_tokens(tokenizer):
    """The tiny tokenizer as a "base" tokenizer: same vocab, GSVA's four tokens removed."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in GSVA_TOKENS]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> SimpleNamespace:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("official")
    full_tok = build_tiny_tokenizer(CORPUS, vocab_size=300)
    base_tok = strip_gsva_tokens(full_tok)
    assert len(base_tok) == len(full_tok) - 4

    cfg = tiny(vocab_size=len(full_tok))
    for k, v in token_ids(full_tok).items():
        setattr(cfg, k, v)
    ours = {k: v.detach().clone() for k, v in GSVAModel(cfg).state_dict().items()}
    vt = "llava.model.vision_tower."
    if any(k.startswith(vt + "vision_model.") for k in ours):
        vt += "vision_model."
    clip_keys = [k for k in ours if k.startswith(vt)]
    sam_enc_keys = [k for k in ours if k.startswith("visual_model.image_encoder.")]
    assert clip_keys and sam_enc_keys

    lora = {}
    for i in range(cfg.num_hidden_layers):
        for proj in ("q_proj", "v_proj"):
            key = f"{LM}layers.{i}.self_attn.{proj}.weight"
            out_f, in_f = ours[key].shape
            lora[key] = (torch.randn(R, in_f) * 0.2, torch.randn(out_f, R) * 0.2)
    expected = dict(ours)
    for key, (a, b) in lora.items():
        expected[key] = ours[key] + (b @ a) * (ALPHA / R)

    # LLaVA folder: LLaMA-HF config (7B-style wrong bos/eos ids included), base tokenizer,
    # two safetensors shards + index. Copies of keys the .bin holds are perturbed (+1).
    llava = root / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlavaLlamaForCausalLM"],
                "model_type": "llava",
                "hidden_size": cfg.hidden_size,
                "intermediate_size": cfg.intermediate_size,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_attention_heads": cfg.num_attention_heads,
                "rms_norm_eps": cfg.rms_norm_eps,
                "max_position_embeddings": cfg.max_position_embeddings,
                "vocab_size": len(base_tok),
                "bos_token_id": 0,
                "eos_token_id": 1,
                "mm_vision_tower": "openai/clip-vit-large-patch14",
                "mm_vision_select_layer": -2,
                "mm_use_im_start_end": True,
            }
        )
    )
    base_tok.save_pretrained(llava)
    llama = {}
    for k, v in ours.items():
        if k.startswith((LM, "llava.lm_head.")):
            llama[official_name(k, vt)] = v if k in FROM_LLAVA else v + 1.0
    rows = len(base_tok)  # the base embedding, before GSVA resized it
    llama["model.embed_tokens.weight"] = torch.randn(rows, cfg.hidden_size)
    llama["lm_head.weight"] = torch.randn(rows, cfg.hidden_size)
    llama["model.mm_projector.weight"] = torch.randn(cfg.hidden_size, cfg.vision_hidden_size)
    llama["model.mm_projector.bias"] = torch.randn(cfg.hidden_size)
    names = sorted(llama)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for shard, keys in shards.items():
        save_file({k: llama[k].contiguous() for k in keys}, str(llava / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (llava / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    # HF CLIP folder (full CLIPModel checkpoint, old-transformers position_ids included).
    clip = root / "clip"
    clip.mkdir()
    clip_sd = {"vision_model." + k[len(vt) :]: ours[k] for k in clip_keys}
    n_pos = ours[vt + "embeddings.position_embedding.weight"].shape[0]
    clip_sd["vision_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    clip_sd["text_model.embeddings.token_embedding.weight"] = torch.randn(10, 8)
    clip_sd["text_projection.weight"] = torch.randn(8, 8)
    clip_sd["visual_projection.weight"] = torch.randn(8, cfg.vision_hidden_size)
    clip_sd["logit_scale"] = torch.tensor(2.6)
    torch.save(clip_sd, clip / "pytorch_model.bin")
    vision_cfg = {"num_attention_heads": cfg.vision_num_attention_heads}
    (clip / "config.json").write_text(
        json.dumps({"model_type": "clip", "vision_config": vision_cfg})
    )

    # SAM checkpoint: the image encoder comes from here; its decoder copy is perturbed.
    sam_sd = {}
    for k, v in ours.items():
        if k.startswith("visual_model."):
            sam_sd[k[len("visual_model.") :]] = v if k in sam_enc_keys else v + 1.0
    sam = root / "sam_vit_tiny.pth"
    torch.save(sam_sd, sam)

    return SimpleNamespace(
        root=root,
        cfg=cfg,
        ours=ours,
        expected=expected,
        lora=lora,
        vt=vt,
        llava=llava,
        clip=clip,
        sam=sam,
        clip_keys=clip_keys,
        sam_enc_keys=sam_enc_keys,
    )


def official_bin(parts: SimpleNamespace, naming: str = "peft04") -> dict[str, torch.Tensor]:
    """The .bin state dict: PEFT prefix, unmerged LoRA, no CLIP/SAM encoder/FROM_LLAVA keys."""
    skip = set(FROM_LLAVA) | set(parts.clip_keys) | set(parts.sam_enc_keys)
    sd = {}
    for k, v in parts.ours.items():
        if k in skip:
            continue
        name = PEFT + official_name(k, parts.vt)
        if k in parts.lora:
            stem = name.removesuffix(".weight")
            base = stem + (".base_layer.weight" if naming == "peft07" else ".weight")
            sd[base] = v
            a, b = parts.lora[k]
            sd[stem + ".lora_A.default.weight"] = a
            sd[stem + ".lora_B.default.weight"] = b
        else:
            sd[name] = v
    sd[PEFT + "model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(16)
    return sd


def run_convert(parts, tmp_path: Path, sd: dict, **kwargs):
    path = tmp_path / "gsva-tiny.bin"
    torch.save(sd, path)
    return convert_official(
        path, parts.llava, parts.sam, tmp_path / "out", clip_dir=parts.clip, **kwargs
    )


def assert_nothing_written(tmp_path: Path) -> None:
    left = [p.name for p in tmp_path.iterdir() if p.name == "out" or p.name.startswith(".out")]
    assert left == [], left


# ---------------------------------------------------------------------------- happy paths
def test_convert_peft04_naming_and_engine(parts, tmp_path):
    from gsva_ros.engine import GSVAEngine

    report = run_convert(parts, tmp_path, official_bin(parts, "peft04"))
    out = tmp_path / "out"

    state = load_file(str(out / "model.safetensors"))
    assert set(state) == set(parts.ours)
    for k, want in parts.expected.items():
        if k in parts.lora:
            w, (a, b) = parts.ours[k], parts.lora[k]
            torch.testing.assert_close(state[k], w + (b @ a) * (ALPHA / R), rtol=0, atol=1e-6)
            assert not torch.equal(state[k], w)
        else:
            assert torch.equal(state[k], want), k  # copied bit-exactly, from the right source

    assert report.geometry == "tiny"
    assert report.lora_r == R and report.lora_alpha == ALPHA
    assert sorted(report.lora_merged) == sorted(parts.lora)
    assert report.keys_from["llava"] == len(FROM_LLAVA)
    assert report.keys_from["clip"] == len(parts.clip_keys)
    assert report.keys_from["sam"] == len(parts.sam_enc_keys)
    assert report.keys_from["gsva_bin"] == len(parts.ours) - sum(
        report.keys_from[s] for s in ("llava", "clip", "sam")
    )
    assert report.shadowed["llava"] > 0 and report.shadowed["sam"] > 0
    ignored = " ".join(report.ignored)
    for piece in (
        "rotary_emb.inv_freq",
        "model.mm_projector.weight",
        "position_ids",
        "text_model.",
        "logit_scale",
    ):
        assert piece in ignored
    assert "LoRA merged" in report.format_table()

    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == parts.cfg.vocab_size
    for k in (
        "seg_token_id",
        "rej_token_id",
        "im_start_token_id",
        "im_end_token_id",
        "bos_token_id",
        "eos_token_id",
    ):
        assert config[k] == getattr(parts.cfg, k), k

    model, tok = load_checkpoint(out)
    assert len(tok) == parts.cfg.vocab_size
    engine = GSVAEngine(str(out), device="cpu")
    image = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    result = engine.segment(image, "the red circle")
    assert len(result.targets) == 1


def test_convert_peft07_naming_bfloat16(parts, tmp_path):
    report = run_convert(parts, tmp_path, official_bin(parts, "peft07"), dtype="bfloat16")
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert report.dtype == "bfloat16" and len(report.lora_merged) == len(parts.lora)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    for k, want in parts.expected.items():
        if k in parts.lora:
            torch.testing.assert_close(state[k].float(), want, rtol=1e-2, atol=1e-2)
        else:
            assert torch.equal(state[k], want.to(torch.bfloat16)), k


def test_merge_lora_formula():
    w, a, b = torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2)
    torch.testing.assert_close(merge_lora(w, a, b, alpha=16, r=2), w + 8 * (b @ a))


def test_expected_token_ids_of_the_releases():
    assert expected_token_ids("gsva-7b") == {
        "seg_token_id": 32003,
        "rej_token_id": 32004,
        "im_start_token_id": 32001,
        "im_end_token_id": 32002,
    }
    assert expected_token_ids("gsva-13b") == {
        "seg_token_id": 32000,
        "rej_token_id": 32001,
        "im_start_token_id": 32002,
        "im_end_token_id": 32003,
    }

    class FakeBase:  # only what the derivation reads: len() and get_vocab()
        def __init__(self, n: int, extra: dict[str, int]) -> None:
            self.n, self.extra = n, extra

        def __len__(self) -> int:
            return self.n

        def get_vocab(self) -> dict[str, int]:
            return {"<unk>": 0, **self.extra}

    # GSVA's adding rule reproduces both releases from their base tokenizers.
    llava7b = FakeBase(32003, {"<im_patch>": 32000, "<im_start>": 32001, "<im_end>": 32002})
    assert expected_token_ids("tiny", llava7b) == expected_token_ids("gsva-7b")
    assert expected_token_ids("tiny", FakeBase(32000, {})) == expected_token_ids("gsva-13b")
    with pytest.raises(ValueError):
        expected_token_ids("tiny")


@pytest.mark.parametrize("make", [gsva_7b, gsva_13b], ids=["7b", "13b"])
def test_release_geometry_is_recovered_from_shapes(make):
    """LLaVA config.json fields + tensor shapes (meta model, nothing allocated) → the preset:
    checks the CLIP ViT-L/SAM ViT-H derivations (windows, global blocks, heads) at real size."""
    from gsva_ros.model import convert as cv

    want = make()
    shapes = cv._meta_shapes(want)
    llava_cfg = {
        "hidden_size": want.hidden_size,
        "intermediate_size": want.intermediate_size,
        "num_hidden_layers": want.num_hidden_layers,
        "num_attention_heads": want.num_attention_heads,
        "rms_norm_eps": want.rms_norm_eps,
        "max_position_embeddings": want.max_position_embeddings,
    }
    geometry = cv.detect_geometry(llava_cfg)
    got, overrides = cv._derive_config(geometry, llava_cfg, None, shapes, cv.vision_prefix())
    assert geometry == want.name and overrides == {} and got == want


# ---------------------------------------------------------------------------- failures
def test_missing_key_is_named(parts, tmp_path):
    sd = official_bin(parts)
    del sd[PEFT + "model.text_hidden_fcs.0.2.bias"]
    with pytest.raises(ConversionError, match=r"missing 1 keys: text_hidden_fcs\.0\.2\.bias"):
        run_convert(parts, tmp_path, sd)
    assert_nothing_written(tmp_path)


def test_unconsumed_keys_are_named(parts, tmp_path):
    sd = official_bin(parts)
    sd[PEFT + "model.extra_head.weight"] = torch.zeros(3)
    sd[PEFT + "model.layers.9.mlp.up_proj.weight"] = torch.zeros(3)  # beyond the 4 layers
    with pytest.raises(ConversionError, match="unconsumed 2 keys") as err:
        run_convert(parts, tmp_path, sd)
    assert "model.extra_head.weight" in str(err.value)
    assert "model.layers.9.mlp.up_proj.weight" in str(err.value)
    assert_nothing_written(tmp_path)


def test_wrong_lora_r_option(parts, tmp_path):
    with pytest.raises(ConversionError, match=r"LoRA rank in the \.bin is 4 but r=8"):
        run_convert(parts, tmp_path, official_bin(parts), lora_r=8)
    assert_nothing_written(tmp_path)


def test_missing_mm_projector(parts, tmp_path):
    sd = official_bin(parts)
    del sd[PEFT + "model.mm_projector.weight"], sd[PEFT + "model.mm_projector.bias"]
    # LLaVA's folder has a projector, but it must not be substituted silently.
    with pytest.raises(ConversionError, match="no model.mm_projector"):
        run_convert(parts, tmp_path, sd)
    assert_nothing_written(tmp_path)


def test_embedding_rows_must_match_tokenizer(parts, tmp_path):
    sd = official_bin(parts)
    for k in (PEFT + "model.embed_tokens.weight", PEFT + "lm_head.weight"):
        sd[k] = sd[k][:-4]  # the base vocabulary: GSVA's tokens missing
    with pytest.raises(ConversionError, match="embed_tokens has 296 rows"):
        run_convert(parts, tmp_path, sd)


def test_lora_shape_mismatch(parts, tmp_path):
    sd = official_bin(parts)
    key = PEFT + "model.layers.2.self_attn.v_proj.lora_B.default.weight"
    sd[key] = torch.zeros(sd[key].shape[0] + 1, R)
    with pytest.raises(ConversionError, match="layers.2.self_attn.v_proj"):
        run_convert(parts, tmp_path, sd)


def test_merged_file_without_lora(parts, tmp_path):
    """A LISA-style merged file (no PEFT prefix, no LoRA): needs lora_r=0, else it is refused."""
    skip = set(FROM_LLAVA) | set(parts.clip_keys) | set(parts.sam_enc_keys)
    sd = {official_name(k, parts.vt): v for k, v in parts.expected.items() if k not in skip}
    with pytest.raises(ConversionError, match="no LoRA tensors but r=4"):
        run_convert(parts, tmp_path, sd, lora_r=4)
    report = run_convert(parts, tmp_path, sd, lora_r=0)
    assert report.lora_merged == [] and report.lora_r == 0
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in parts.expected.items())


class Payload:
    """Pickles to ``os.system("touch MARKER")``: runs on any unrestricted unpickling."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("which", ["gsva_bin", "sam"])
def test_malicious_pickle_is_refused(parts, tmp_path, which):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model.norm.weight": torch.zeros(2), "x": Payload(marker)}, evil)
    good = tmp_path / "gsva-tiny.bin"
    torch.save(official_bin(parts), good)
    bin_path, sam_path = (evil, parts.sam) if which == "gsva_bin" else (good, evil)
    with pytest.raises(ConversionError, match="refusing to unpickle"):
        convert_official(bin_path, parts.llava, sam_path, tmp_path / "out", clip_dir=parts.clip)
    assert not marker.exists()
    assert_nothing_written(tmp_path)
    # The payload is live: an unrestricted load would have run it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_refuses_non_empty_output(parts, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="not empty"):
        run_convert(parts, tmp_path, official_bin(parts))
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


# ---------------------------------------------------------------------------- CLI
def test_cli_end_to_end(parts, tmp_path, capsys):
    from gsva_ros.cli.main import main

    path = tmp_path / "gsva-tiny.bin"
    torch.save(official_bin(parts, "peft07"), path)
    out = tmp_path / "cli-out"
    argv = [
        "convert",
        "--gsva-bin",
        str(path),
        "--llava",
        str(parts.llava),
        "--sam",
        str(parts.sam),
        "--clip",
        str(parts.clip),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "LoRA merged" in table and f"r={R}" in table
    model, _ = load_checkpoint(out)
    k = f"{LM}layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(model.state_dict()[k], parts.expected[k], rtol=0, atol=1e-6)

    # Failures: one error line, non-zero exit, the earlier output untouched.
    assert main(argv + ["--lora-r", "8", "--overwrite"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gsva-ros convert: error:") and "\n" not in err and "r=8" in err
    assert main(argv) == 1
    assert "not empty" in capsys.readouterr().err
    assert load_checkpoint(out)[0] is not None
