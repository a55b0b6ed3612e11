"""Training recipe options: curriculum, held-back decoder, parameter groups."""

from __future__ import annotations

import pytest
import torch

from gsva_ros.data.grefcoco import load_grefcoco
from gsva_ros.data.synth import generate_dataset
from gsva_ros.model.config import tiny
from gsva_ros.model.gsva import GSVAModel
from gsva_ros.model.tokenizer import build_tiny_tokenizer, token_ids
from gsva_ros.training import GRESTrainDataset, TrainOptions, group_images, parameter_groups, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "d"
    generate_dataset(root, n=24, seed=11, max_size=160, expressions_per_image=(4, 8),
                     progress=False)
    return load_grefcoco(root, split="train")


@pytest.fixture(scope="module")
def small(data):
    tok = build_tiny_tokenizer([s.sentence for s in data], vocab_size=300)
    cfg = tiny(vocab_size=len(tok))
    for k, v in token_ids(tok).items():
        setattr(cfg, k, v)
    cfg.sam_image_size, cfg.sam_depth, cfg.sam_global_attn_indexes = 128, 1, [0]
    cfg.num_hidden_layers, cfg.vision_num_hidden_layers = 1, 2
    return cfg, tok


def test_single_first_leaves_multi_target_expressions_out(data, small):
    cfg, tok = small
    images = group_images(data)
    assert any(s.case == "multi" for g in images for s in g.samples)
    ds = GRESTrainDataset(images, tok, cfg, max_slots=8, seed=0)
    seen = {}
    for single_only in (True, False):
        ds.single_only = single_only
        seen[single_only] = set()
        for epoch in range(3):
            ds.epoch = epoch
            for i, g in enumerate(images):
                if any(s.case == "single" for s in g.samples):  # others keep every case
                    seen[single_only] |= {g.samples[j].case for j in ds[i]["picked"]}
    assert "multi" not in seen[True] and "single" in seen[True]
    assert "multi" in seen[False]


def test_min_slots_draws_every_count_up_to_max_slots_and_keeps_a_target(data, small):
    cfg, tok = small
    images = group_images(data)
    have = [len(g.samples) for g in images]
    assert max(have) >= 3
    counts = {True: set(), False: set()}
    for vary in (True, False):
        ds = GRESTrainDataset(images, tok, cfg, max_slots=3, seed=0, min_slots=1 if vary else 0)
        for epoch in range(6):
            ds.epoch = epoch
            for i, g in enumerate(images):
                it = ds[i]
                counts[vary].add((len(g.samples) >= 3, len(it["picked"])))
                assert len(set(it["picked"])) == len(it["picked"])  # without replacement
                assert any(not g.samples[j].no_target for j in it["picked"])
                assert int(it["labels"].eq(cfg.seg_token_id).sum()) >= 1
    # GSVA's draw: an image with enough expressions always fills max_slots
    assert {n for full, n in counts[False] if full} == {3}
    assert {n for full, n in counts[True] if full} == {1, 2, 3}
    with pytest.raises(ValueError, match="min_slots"):
        GRESTrainDataset(images, tok, cfg, max_slots=3, seed=0, min_slots=4)


def test_short_share_mixes_short_draws_into_full_conversations(data, small):
    cfg, tok = small
    images = [g for g in group_images(data) if len(g.samples) >= 3]
    assert images

    def counts(share: float, min_slots: int = 1) -> list[int]:
        ds = GRESTrainDataset(images, tok, cfg, max_slots=3, seed=0, min_slots=min_slots,
                              short_share=share)
        out = []
        for epoch in range(40):
            ds.epoch = epoch
            out += [len(ds[i]["picked"]) for i in range(len(images))]
        return out

    everyone, none, half = counts(1.0), counts(0.0), counts(0.5)
    assert set(none) == {3}  # share 0 = GSVA's draw despite min_slots
    assert set(everyone) == set(half) == {1, 2, 3}
    short = {s: sum(n < 3 for n in c) / len(c) for s, c in ((1.0, everyone), (0.5, half))}
    # uniform 1..3 is short 2/3 of the time; with share 0.5 about half as often
    assert 0.55 < short[1.0] < 0.78 and 0.22 < short[0.5] < 0.45
    assert counts(0.5, min_slots=0) == none  # no min_slots: the share changes nothing
    with pytest.raises(ValueError, match="short_share"):
        GRESTrainDataset(images, tok, cfg, max_slots=3, seed=0, min_slots=1, short_share=1.5)


def test_parameter_groups_split_off_prompt_encoder_and_decoder(small):
    cfg, _ = small
    model = GSVAModel(cfg)
    rest, decoder = parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decoder and all(
        names[id(p)].startswith(("visual_model.mask_decoder.", "visual_model.prompt_encoder."))
        for p in decoder
    )
    assert len(rest) + len(decoder) == len(list(model.parameters()))
    assert any(names[id(p)].startswith("visual_model.image_encoder.") for p in rest)


def test_held_decoder_stays_at_its_initialisation(data, small, tmp_path):
    cfg, tok = small
    torch.manual_seed(0)
    model = GSVAModel(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opts = TrainOptions(steps=3, batch_size=2, lr=1e-3, warmup_steps=0, save_every=100,
                        decoder_hold_steps=10)
    train(model, tok, data, tmp_path / "run", opts)
    from gsva_ros.model.checkpoint import load_checkpoint

    after, _ = load_checkpoint(tmp_path / "run")
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, before[n])}
    held = ("visual_model.mask_decoder.", "visual_model.prompt_encoder.")
    assert not any(n.startswith(held) for n in changed)
    assert any(n.startswith("text_hidden_fcs.") for n in changed)
    assert any(n.startswith("visual_model.image_encoder.") for n in changed)


def test_summary_text_lists_each_expressions_content_words():
    import random

    from gsva_ros.training import summary_text

    exprs = ["the small blue star on the left", "all circles"]
    text = summary_text(exprs, random.Random(3))
    assert text.startswith("Sure, they are ") and text.endswith(".")
    body = text[len("Sure, they are ") : -1]
    first, second = body.split(", ")
    phrase, words = first.split(": ")
    assert phrase == exprs[0] and sorted(words.split()) == ["blue", "left", "small", "star"]
    assert second == "all circles: circles"
    orders = {summary_text(exprs, random.Random(s)).split(": ")[1] for s in range(20)}
    assert len(orders) > 1  # the order is random, so ':' must carry the whole bag of words


def test_pretrain_language_lowers_its_loss_and_touches_only_the_llm(data, small):
    from gsva_ros.training import pretrain_language

    cfg, tok = small
    torch.manual_seed(0)
    model = GSVAModel(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = pretrain_language(model, tok, group_images(data), steps=40, lr=3e-3, batch_size=8)
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.6 * losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("llava.model.language_model.") for n in changed)
    assert any(n.startswith("llava.lm_head.") for n in changed)
    assert not any(n.startswith(("visual_model.", "text_hidden_fcs.", "llava.model.vision_tower.",
                                 "llava.model.multi_modal_projector.")) for n in changed)


def test_pretrain_language_refuses_a_lora_model(small):
    from gsva_ros.training import pretrain_language

    cfg, tok = small
    lora = GSVAModel(type(cfg)(**{**cfg.to_dict(), "lora_r": 4}))
    with pytest.raises(ValueError, match="from scratch"):
        pretrain_language(lora, tok, [], steps=1, lr=1e-3)


def test_text_batch_pads_with_ignored_labels(data, small):
    import random

    from gsva_ros.training import text_batch

    cfg, tok = small
    ids, labels, mask = text_batch(group_images(data), tok, cfg, random.Random(0), rows=6)
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 6
    assert (ids[:, 0] == cfg.bos_token_id).all() and (labels[:, 0] == -100).all()
    real = labels[:, 1:] != -100
    assert torch.equal(labels[:, 1:][real], ids[:, 1:][real])
    assert (ids[:, 1:][~real] == cfg.pad_token_id).all()
    assert torch.equal(mask[:, 1:].bool(), real)
    assert real.sum(1).min() < real.sum(1).max()  # rows of different length really are padded


def test_aux_lm_loss_is_added_with_its_weight_and_logged(data, small, tmp_path):
    import json

    cfg, tok = small
    torch.manual_seed(0)
    opts = TrainOptions(steps=3, batch_size=2, lr=1e-3, warmup_steps=0, save_every=100,
                        log_every=1, aux_lm_weight=2.5, aux_lm_rows=4)
    train(GSVAModel(cfg), tok, data, tmp_path / "run", opts)
    recs = [json.loads(x) for x in (tmp_path / "run" / "loss_log.jsonl").read_text().splitlines()]
    assert len(recs) == 3
    for r in recs:
        assert r["aux_lm"] > 0
        gsva = r["ce"] + opts.bce_weight * r["bce"] + opts.dice_weight * r["dice"]
        assert r["loss"] == pytest.approx(gsva + 2.5 * r["aux_lm"], rel=1e-4)


def test_aux_lm_loss_refuses_a_lora_model(data, small, tmp_path):
    cfg, tok = small
    lora = GSVAModel(type(cfg)(**{**cfg.to_dict(), "lora_r": 4}))
    opts = TrainOptions(steps=1, batch_size=2, save_every=100, aux_lm_weight=1.0)
    with pytest.raises(ValueError, match="from scratch"):
        train(lora, tok, data, tmp_path / "run", opts)


def test_phrase_loss_is_zero_for_a_perfect_read_out_and_positive_otherwise():
    from gsva_ros.training import phrase_loss

    head = torch.nn.Linear(4, 10)
    phrases = [[1, 3, 3], [7]]  # repeated tokens count once
    prompts = torch.eye(4)[:2].requires_grad_(True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.weight[[1, 3], 0] = 60.0  # prompt 0 → tokens 1 and 3, equally
        head.weight[7, 1] = 60.0  # prompt 1 → token 7
    assert phrase_loss(head, prompts, phrases).item() == pytest.approx(0.0, abs=1e-5)
    wrong = phrase_loss(head, prompts, [[7], [1, 3]])
    assert wrong.item() > 10
    wrong.backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0  # it trains the prompt


def test_slot_prompts_are_the_mask_prompts_of_every_slot(data, small):
    from gsva_ros.training import collate

    cfg, tok = small
    torch.manual_seed(0)
    model = GSVAModel(cfg).eval()
    ds = GRESTrainDataset(group_images(data), tok, cfg, max_slots=5, seed=0)
    items = [ds[0], ds[1]]
    for g, it in zip(ds.images[:2], items, strict=True):  # targets: the picked phrases' tokens
        assert it["phrases"] == [tok(g.samples[i].sentence, add_special_tokens=False)
                                 ["input_ids"] for i in it["picked"]]
    batch = collate(items, cfg.pad_token_id)
    phrases = batch.pop("phrases")
    batch.pop("categories")  # training-only targets, like the phrases
    batch.pop("single")
    with torch.no_grad():
        res = model.forward_train(**batch)
        n = len(items[0]["picked"])
        assert res.slot_prompts.shape == (len(phrases), cfg.sam_prompt_dim)
        ids = batch["input_ids"][0]
        feats = model.encode_clip(batch["clip_pixels"][:1])
        hidden, _ = model.run_language(model.embed(ids[None], feats))
        slot = (ids[1:] == cfg.seg_token_id) | (ids[1:] == cfg.rej_token_id)
        expected = model.project_hidden(hidden[0, :-1][slot])
    assert expected.shape[0] == n
    assert torch.allclose(res.slot_prompts[:n], expected, atol=1e-4)


def _train_with_read_out(data, small, run_dir, **weights):
    """Two logged steps with a training-only objective → (options, log records, train state);
    also checks the saved model holds exactly the model's weights (no read-out head)."""
    import json

    from safetensors.torch import load_file

    cfg, tok = small
    torch.manual_seed(0)
    opts = TrainOptions(steps=2, batch_size=2, lr=1e-3, warmup_steps=0, save_every=1,
                        log_every=1, **weights)
    model = GSVAModel(cfg)
    train(model, tok, data, run_dir, opts)
    recs = [json.loads(x) for x in (run_dir / "loss_log.jsonl").read_text().splitlines()]
    saved = load_file(run_dir / "model.safetensors")
    assert set(saved) == set(model.state_dict())  # the read-out head is training-only
    state = torch.load(run_dir / "last" / "train_state.pt", weights_only=True)
    return opts, recs, state


def test_phrase_objective_is_added_logged_and_never_saved_with_the_model(data, small, tmp_path):
    opts, recs, state = _train_with_read_out(data, small, tmp_path / "run", phrase_weight=0.5)
    for r in recs:
        assert r["phrase"] > 0
        gsva = r["ce"] + opts.bce_weight * r["bce"] + opts.dice_weight * r["dice"]
        assert r["loss"] == pytest.approx(gsva + 0.5 * r["phrase"], rel=1e-4)
    cfg = small[0]
    assert state["phrase_head"]["weight"].shape == (cfg.vocab_size, cfg.sam_prompt_dim)


def test_decoder_lr_scale_applies_after_the_hold():
    from gsva_ros.training import lr_factors, lr_lambda

    opts = TrainOptions(steps=100, warmup_steps=10, decoder_hold_steps=20,
                        decoder_hold_scale=0.1, decoder_lr_scale=3.0)
    rest, decoder = lr_factors(opts)
    for s in (0, 5, 19):
        assert decoder(s) == pytest.approx(0.1 * rest(s))
    for s in (20, 50, 99):
        assert rest(s) == pytest.approx(lr_lambda(s, 10, 100)) and rest(s) > 0
        assert decoder(s) == pytest.approx(3.0 * rest(s))
    plain_rest, plain_decoder = lr_factors(TrainOptions(steps=100, warmup_steps=10))
    assert all(plain_decoder(s) == plain_rest(s) for s in range(100))  # GSVA: one schedule


def test_rej_mask_weight_adds_a_bce_on_rejected_slots_only(data, small):
    from gsva_ros.training import collate

    cfg, tok = small
    torch.manual_seed(0)
    model = GSVAModel(cfg).eval()
    ds = GRESTrainDataset(group_images(data), tok, cfg, max_slots=5, seed=0)
    items = [ds[i] for i in range(len(ds))]
    with_rej = [it for it in items if any(not m.any() for m in it["masks"])][:2]
    assert with_rej, "fixture data should hold conversations with absent targets"
    batch = collate(with_rej, cfg.pad_token_id)
    for key in ("phrases", "categories", "single"):  # training-only targets
        batch.pop(key)
    with torch.no_grad():
        res = {w: model.forward_train(**batch, rej_mask_weight=w) for w in (0.0, 1.0, 2.0)}
    out = {w: type("R", (), {k: float(getattr(r, k)) for k in ("ce", "bce", "dice")})
           for w, r in res.items()}
    assert out[1.0].bce > out[0.0].bce
    assert (out[2.0].bce - out[0.0].bce) == pytest.approx(2 * (out[1.0].bce - out[0.0].bce),
                                                         rel=1e-4)
    for w in (1.0, 2.0):  # the [SEG] masks and the text are scored exactly as before
        assert out[w].dice == pytest.approx(out[0.0].dice, rel=1e-6)
        assert out[w].ce == pytest.approx(out[0.0].ce, rel=1e-6)


def test_pooling_follows_sams_geometry_and_the_losses_use_it():
    import torch.nn.functional as F

    from gsva_ros.training import category_loss, colour_loss, pool_under_masks

    # SAM input 8 px, grid 4×4 (2 px a cell); the image is 4×8 (H×W) resized to 4×8, so
    # SAM pads it at the bottom: rows 4-7 of the input, grid rows 2-3, are padding.
    emb = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    pixels = torch.randn(1, 3, 8, 8)
    masks = torch.zeros(3, 4, 8, dtype=torch.bool)
    masks[0, 0:2, 0:4] = True  # grid cells (0, 0), (0, 1)
    masks[1, 2:4, 4:8] = True  # grid cells (1, 2), (1, 3)
    masks[2, :, :] = True  # not kept below
    keep = torch.tensor([True, True, False])
    pooled, colours = pool_under_masks(emb, pixels, [masks], [keep], [(4, 8)])
    e, px = emb[0], pixels[0]
    want = torch.stack([e[:, 0, 0:2].mean(1), e[:, 1, 2:4].mean(1)])
    assert torch.allclose(pooled, want)
    want_px = torch.stack([px[:, 0:2, 0:4].mean((1, 2)), px[:, 2:4, 4:8].mean((1, 2))])
    assert torch.allclose(colours, want_px, atol=1e-6)

    head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    loss = category_loss(head, pooled, torch.tensor([1, 0]))
    assert float(loss) == pytest.approx(float(F.cross_entropy(want, torch.tensor([1, 0]))))
    rgb = torch.nn.Linear(2, 3)
    assert float(colour_loss(rgb, pooled, colours)) == pytest.approx(
        float(F.mse_loss(rgb(want), want_px)), rel=1e-5)
    # nothing kept → empty pools and no loss
    none, none_px = pool_under_masks(emb, pixels, [masks], [torch.zeros(3, dtype=torch.bool)],
                                     [(4, 8)])
    assert none.shape == (0, 2) and none_px.shape == (0, 3)
    assert category_loss(head, none, torch.zeros(0, dtype=torch.long)) is None
    assert colour_loss(rgb, none, none_px) is None


def test_dataset_names_the_category_of_single_targets_only(data, small):
    from gsva_ros.training import category_classes

    cfg, tok = small
    index = category_classes(data)
    assert len(index) == 4  # the four shapes of the synthetic scenes
    ds = GRESTrainDataset(group_images(data), tok, cfg, max_slots=5, seed=0)
    assert all(int(c) == -1 for c in ds[0]["categories"])  # objective off: nothing named
    ds.category_index = index
    seen = 0
    for i in range(len(ds)):
        item, g = ds[i], ds.images[i]
        for slot, cat in zip(item["picked"], item["categories"].tolist(), strict=True):
            sample = g.samples[slot]
            want = index[sample.category_ids[0]] if sample.case == "single" else -1
            assert cat == want
            seen += cat >= 0
    assert seen > 0


# read-outs by option: (log key, train-state key, rows of its head, whether it reads CLIP)
READ_OUTS = {
    "category_weight": [("category", "category_head", 4, False)],
    "colour_weight": [("colour", "colour_head", 3, False)],
    "clip_weight": [("clip_category", "clip_category_head", 4, True),
                    ("clip_colour", "clip_colour_head", 3, True)],
}


@pytest.mark.parametrize("weights", [
    {"category_weight": 0.5},
    {"colour_weight": 0.5},
    {"category_weight": 0.5, "colour_weight": 2.0},
    {"clip_weight": 0.5},
    {"category_weight": 0.5, "colour_weight": 2.0, "clip_weight": 3.0},
])
def test_pooled_read_outs_are_added_logged_and_never_saved_with_the_model(
    data, small, tmp_path, weights
):
    cfg = small[0]
    opts, recs, state = _train_with_read_out(data, small, tmp_path / "run", **weights)
    for option, parts in READ_OUTS.items():
        for key, head, rows, clip in parts:
            if option not in weights:
                assert key not in recs[0] and head not in state
                continue
            assert any(r[key] > 0 for r in recs)
            dim = cfg.hidden_size if clip else cfg.sam_prompt_dim
            assert state[head]["weight"].shape == (rows, dim)
    for r in recs:
        gsva = r["ce"] + opts.bce_weight * r["bce"] + opts.dice_weight * r["dice"]
        extra = sum(w * r[key] for option, w in weights.items()
                    for key, *_ in READ_OUTS[option])
        assert r["loss"] == pytest.approx(gsva + extra, rel=1e-4)


def test_clip_pooling_follows_clips_centre_crop():
    from gsva_ros.training import pool_clip_under_masks

    # image 4×8 (H×W), CLIP input 4 px: resized to 4×8, centre crop = columns 2-5; grid 2×2
    feats = torch.arange(4 * 3, dtype=torch.float32).reshape(1, 4, 3)  # cells row-major
    masks = torch.zeros(4, 4, 8, dtype=torch.bool)
    masks[0, 0:2, 2:4] = True  # cell (0, 0)
    masks[1, :, 4:6] = True  # cells (0, 1) and (1, 1)
    masks[2, 2:4, 0:2] = True  # outside the crop: nothing of it reaches the language model
    masks[3, :, :] = True  # not kept below
    keep = torch.tensor([True, True, True, False])
    pooled = pool_clip_under_masks(feats, [masks], [keep], 4)
    f = feats[0]
    want = torch.stack([f[0], (f[1] + f[3]) / 2, torch.zeros(3)])
    assert torch.allclose(pooled, want)
    none = pool_clip_under_masks(feats, [masks], [torch.zeros(4, dtype=torch.bool)], 4)
    assert none.shape == (0, 3)


def test_dataset_marks_single_target_slots(data, small):
    cfg, tok = small
    ds = GRESTrainDataset(group_images(data), tok, cfg, max_slots=5, seed=0)
    cases = set()
    for i in range(len(ds)):
        item, g = ds[i], ds.images[i]
        for slot, single in zip(item["picked"], item["single"].tolist(), strict=True):
            assert single == (g.samples[slot].case == "single")
            cases.add(single)
    assert cases == {True, False}
