"""Synthetic gRefCOCO generator: determinism, exact masks, truthful expressions, case mix."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from gsva_ros.cli import main as cli_main
from gsva_ros.data import synth
from gsva_ros.data.grefcoco import decode_rle
from gsva_ros.data.synth import (
    ObjectSpec,
    SceneSpec,
    generate_dataset,
    render,
    sample_expressions,
    sample_scene,
)

SEED = 0
N_IMAGES = 200

# The test's own vocabulary, kept separate from the module's tables on purpose.
COLOR_WORDS = {"red", "green", "blue", "yellow", "purple", "orange"}
SHAPE_NOUNS = {"circle", "square", "triangle", "star", "shape"}
SIZE_WORDS = {"small", "big"}
POSITIONS = {
    ("on", "the", "left"): "left",
    ("on", "the", "right"): "right",
    ("at", "the", "top"): "top",
    ("at", "the", "bottom"): "bottom",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("synth") / "train"
    summary = generate_dataset(out, N_IMAGES, SEED, progress=False)
    refs = json.loads((out / "grefs(unc).json").read_text())
    inst = json.loads((out / "instances.json").read_text())
    return {"out": out, "summary": summary, "refs": refs, "inst": inst}


def _scene(i: int, seed: int = SEED) -> tuple[SceneSpec, np.ndarray, list[np.ndarray]]:
    """Re-create image ``i`` the documented way (its own generator seeded with [seed, i])."""
    scene = sample_scene(np.random.default_rng([seed, i]))
    image, masks = render(scene)
    return scene, image, masks


def _anns_by_image(inst: dict) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for ann in inst["annotations"]:
        out.setdefault(ann["image_id"], []).append(ann)
    return out


# ------------------------------------------------------------------------------------------
# Determinism and file layout
# ------------------------------------------------------------------------------------------


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "a", 6, 5, progress=False)
    generate_dataset(tmp_path / "b", 6, 5, progress=False)
    generate_dataset(tmp_path / "c", 6, 6, progress=False)
    a, b, c = (_tree_bytes(tmp_path / d) for d in "abc")
    assert a == b
    assert set(a) == set(c)
    assert a["instances.json"] != c["instances.json"]
    assert a["grefs(unc).json"] != c["grefs(unc).json"]
    assert a["images/train_000000.png"] != c["images/train_000000.png"]


def test_sampling_and_rendering_are_pure_functions_of_the_generator() -> None:
    s1, im1, m1 = _scene(3)
    s2, im2, m2 = _scene(3)
    assert s1 == s2
    assert np.array_equal(im1, im2)
    assert all(np.array_equal(a, b) for a, b in zip(m1, m2, strict=True))
    e1 = sample_expressions(s1, m1, np.random.default_rng(1), 5)
    e2 = sample_expressions(s2, m2, np.random.default_rng(1), 5)
    assert e1 == e2


def test_summary_matches_files(dataset: dict) -> None:
    s, refs, inst = dataset["summary"], dataset["refs"], dataset["inst"]
    sentences = [sent for r in refs for sent in r["sentences"]]
    assert s["images"] == len(inst["images"]) == N_IMAGES
    assert s["refs"] == len(refs)
    assert s["sentences"] == len(sentences) == s["single"] + s["multi"] + s["no-target"]
    assert len({x["sent_id"] for x in sentences}) == len(sentences)
    assert len({r["ref_id"] for r in refs}) == len(refs)
    for img in inst["images"]:
        assert (dataset["out"] / "images" / img["file_name"]).is_file()
    assert [c["name"] for c in inst["categories"]] == ["circle", "square", "triangle", "star"]


def test_crash_leaves_no_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_render = synth.render

    def flaky_render(scene: SceneSpec) -> tuple:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real_render(scene)

    monkeypatch.setattr(synth, "render", flaky_render)
    with pytest.raises(RuntimeError, match="boom"):
        generate_dataset(tmp_path / "out", 5, 0, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary folder


def test_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_dataset(tmp_path, 1, 0, progress=False)
    with pytest.raises(FileExistsError):
        generate_dataset(tmp_path, 1, 0, progress=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------
# Masks, geometry and sizes
# ------------------------------------------------------------------------------------------


def test_annotations_are_exactly_the_visible_pixels(dataset: dict) -> None:
    anns = _anns_by_image(dataset["inst"])
    for img in dataset["inst"]["images"][:30]:
        i = img["id"] - 1
        scene, image, masks = _scene(i)
        stored = cv2.imread(str(dataset["out"] / "images" / img["file_name"]))[..., ::-1]
        assert np.array_equal(stored, image)
        assert len(anns[img["id"]]) == len(scene.objects)
        union = np.zeros(image.shape[:2], dtype=np.int32)
        for obj_idx, (ann, obj) in enumerate(zip(anns[img["id"]], scene.objects, strict=True)):
            mask = decode_rle(ann["segmentation"])
            assert ann["segmentation"]["size"] == [img["height"], img["width"]]
            assert isinstance(ann["segmentation"]["counts"], list)  # uncompressed RLE
            assert np.array_equal(mask, masks[obj_idx])
            assert ann["area"] == int(mask.sum())
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(mask)
            assert (x, y, w, h) == (xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1)
            union += mask
            _check_visible(scene, image, obj_idx, obj, mask)
        assert union.max() <= 1  # instance masks are disjoint


def _check_visible(
    scene: SceneSpec, image: np.ndarray, idx: int, obj: ObjectSpec, mask: np.ndarray
) -> None:
    """The mask is the object's own shape minus what later objects cover, in its colour."""
    alone = SceneSpec(scene.height, scene.width, scene.background, [obj])
    _, (full,) = render(alone)
    assert not (mask & ~full).any()
    assert mask.sum() >= 0.6 * full.sum()  # never (almost) fully occluded
    later = np.zeros_like(mask)
    for other in scene.objects[idx + 1 :]:
        _, (m,) = render(SceneSpec(scene.height, scene.width, scene.background, [other]))
        later |= m
    # Inside the object, away from any edge, mask == not covered by a later object.
    core = cv2.erode(full.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    later_edge = cv2.dilate(later.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    far = core & ~(later_edge & ~later)
    assert np.array_equal(mask[far], ~later[far])
    interior = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    diff = np.abs(image[interior].astype(int) - np.array(obj.fill())).max(axis=1)
    assert (diff <= 1).mean() > 0.99


def test_objects_inside_central_square_and_sizes_in_bounds(dataset: dict) -> None:
    anns = _anns_by_image(dataset["inst"])
    for img in dataset["inst"]["images"]:
        h, w = img["height"], img["width"]
        assert 96 <= h <= 640 and 96 <= w <= 640
        assert 0.55 <= w / h <= 1.75
        side = min(h, w)
        x0, y0 = (w - side) // 2, (h - side) // 2
        for ann in anns[img["id"]]:
            x, y, bw, bh = ann["bbox"]
            assert x0 <= x and x + bw <= x0 + side and y0 <= y and y + bh <= y0 + side
    for i in range(N_IMAGES):
        scene = sample_scene(np.random.default_rng([SEED, i]))
        side = min(scene.height, scene.width)
        assert 1 <= len(scene.objects) <= 6
        for obj in scene.objects:
            assert 0.10 <= 2 * obj.radius / side <= 0.35
            poly = synth.shape_polygon(obj)
            x0, y0, _ = scene.square
            assert poly[:, 0].min() >= x0 and poly[:, 0].max() <= x0 + side
            assert poly[:, 1].min() >= y0 and poly[:, 1].max() <= y0 + side


def test_size_bounds_are_respected(tmp_path: Path) -> None:
    for i in range(40):
        scene = sample_scene(np.random.default_rng([9, i]), min_size=120, max_size=200)
        assert 120 <= scene.height <= 200 and 120 <= scene.width <= 200
    with pytest.raises(ValueError):
        sample_scene(np.random.default_rng(0), min_size=300, max_size=200)


def test_variety(dataset: dict) -> None:
    kinds, overlaps, n_objects, shapes = set(), 0, set(), set()
    for i in range(N_IMAGES):
        scene = sample_scene(np.random.default_rng([SEED, i]))
        kinds.add(scene.background.kind)
        n_objects.add(len(scene.objects))
        shapes |= {o.shape for o in scene.objects}
        objs = scene.objects
        overlaps += any(
            np.hypot(a.cx - b.cx, a.cy - b.cy) < a.radius + b.radius
            for j, a in enumerate(objs)
            for b in objs[j + 1 :]
        )
    assert kinds == {"solid", "gradient", "noise", "texture"}
    assert n_objects == {1, 2, 3, 4, 5, 6}
    assert shapes == {"circle", "square", "triangle", "star"}
    assert overlaps >= 10  # some occlusion happens


# ------------------------------------------------------------------------------------------
# Expressions: semantics re-checked from the words
# ------------------------------------------------------------------------------------------


def _parse(sentence: str) -> dict:
    """Independent parser of the generator's grammar."""
    toks = sentence.split()
    assert toks[0] in ("the", "all"), sentence
    q = {"all": toks[0] == "all", "extreme": None, "size": None, "color": None}
    rest = toks[1:]
    if rest[0] in ("leftmost", "rightmost"):
        q["extreme"], rest = rest[0], rest[1:]
    if rest[0] in SIZE_WORDS:
        q["size"], rest = rest[0], rest[1:]
    if rest[0] in COLOR_WORDS:
        q["color"], rest = rest[0], rest[1:]
    noun, rest = rest[0], rest[1:]
    q["plural"] = noun.endswith("s") and noun[:-1] in SHAPE_NOUNS
    q["shape"] = noun[:-1] if q["plural"] else noun
    assert q["shape"] in SHAPE_NOUNS, sentence
    q["position"] = POSITIONS[tuple(rest)] if rest else None
    assert not (q["all"] and not q["plural"]), sentence
    return q


def _check_expression(sentence: str, targets: list[int], scene: SceneSpec, masks: list) -> None:
    q = _parse(sentence)
    side = min(scene.height, scene.width)
    objs = scene.objects

    def match(o: ObjectSpec, use_size: bool = True) -> bool:
        return (
            (q["color"] is None or o.color == q["color"])
            and (q["shape"] == "shape" or o.shape == q["shape"])
            and (not use_size or q["size"] is None or o.size_word == q["size"])
        )

    found = [i for i, o in enumerate(objs) if match(o)]
    if not targets:  # no-target: nothing in the scene has these attributes
        assert found == [], sentence
        return
    if q["size"] is not None:  # the size word must separate the objects it compares
        others = [i for i, o in enumerate(objs) if match(o, use_size=False) and i not in found]
        assert others, sentence
        for a in found:
            for b in others:
                ra, rb = objs[a].radius, objs[b].radius
                assert max(ra, rb) >= 1.6 * min(ra, rb), sentence
    cent = [np.argwhere(m).mean(axis=0)[::-1] for m in masks]  # (x, y)
    if q["plural"]:
        assert sorted(targets) == found and len(found) >= 2, sentence
    elif q["position"] is not None:
        assert len(found) == 2 and len(targets) == 1, sentence
        axis = 0 if q["position"] in ("left", "right") else 1
        a, b = sorted(found, key=lambda i: cent[i][axis])
        want = a if q["position"] in ("left", "top") else b
        assert targets == [want], sentence
        assert cent[b][axis] - cent[a][axis] >= 0.15 * side, sentence
    elif q["extreme"] is not None:
        assert len(found) >= 2 and len(targets) == 1, sentence
        by_x = sorted(found, key=lambda i: cent[i][0])
        if q["extreme"] == "leftmost":
            assert targets == [by_x[0]] and cent[by_x[1]][0] - cent[by_x[0]][0] >= 0.15 * side
        else:
            assert targets == [by_x[-1]] and cent[by_x[-1]][0] - cent[by_x[-2]][0] >= 0.15 * side
    else:
        assert targets == found, sentence  # singular: exactly one object


def test_every_expression_is_truthful(dataset: dict) -> None:
    anns = _anns_by_image(dataset["inst"])
    refs_by_image: dict[int, list[dict]] = {}
    for r in dataset["refs"]:
        refs_by_image.setdefault(r["image_id"], []).append(r)
    checked = 0
    for img in dataset["inst"]["images"]:
        # Masks from the written annotations (checked against rendering in another test).
        scene = sample_scene(np.random.default_rng([SEED, img["id"] - 1]))
        masks = [decode_rle(a["segmentation"]) for a in anns[img["id"]]]
        assert len(masks) == len(scene.objects)
        obj_of = {a["id"]: j for j, a in enumerate(anns[img["id"]])}
        for r in refs_by_image.get(img["id"], []):
            targets = [] if r["ann_id"] == [-1] else [obj_of[a] for a in r["ann_id"]]
            assert r["no_target"] == (not targets)
            if len(r["ann_id"]) > 1:
                assert -1 not in r["ann_id"]
            for s in r["sentences"]:
                assert s["sent"] == s["raw"] and s["tokens"] == s["sent"].split()
                _check_expression(s["sent"], targets, scene, masks)
                checked += 1
    assert checked == dataset["summary"]["sentences"]


def test_grammar_is_regular(dataset: dict) -> None:
    vocab = set()
    for r in dataset["refs"]:
        for s in r["sentences"]:
            assert "," not in s["sent"] and " and " not in f" {s['sent']} "  # node splits these
            assert s["sent"] == s["sent"].lower().strip()
            vocab |= set(s["sent"].split())
    allowed = COLOR_WORDS | SIZE_WORDS | {"the", "all", "on", "at", "left", "right", "top"}
    allowed |= {"bottom", "leftmost", "rightmost"} | SHAPE_NOUNS | {n + "s" for n in SHAPE_NOUNS}
    assert vocab <= allowed
    assert COLOR_WORDS | SIZE_WORDS | {"leftmost", "rightmost", "left", "top"} <= vocab


def _expected_kind(sentence: str, no_target: bool, n_targets: int) -> set[str]:
    """The template families a sentence can come from, read off its words by the test."""
    w = sentence.split()
    if no_target:
        return {"absent-color-shape", "absent-shape", "absent-color", "absent-far"}
    if sentence == "all shapes":
        return {"all", "plural"}
    if "leftmost" in w or "rightmost" in w:
        return {"extreme"}
    if tuple(w[-3:]) in POSITIONS:
        return {"position"}
    if SIZE_WORDS & set(w):
        return {"size-plural"} if n_targets > 1 else {"size"}
    if n_targets > 1:
        return {"plural"}
    has_color, noun = bool(COLOR_WORDS & set(w)), w[-1]
    if has_color and noun != "shape":
        return {"color-shape"}
    return {"color"} if has_color else {"shape"}


def test_every_sentence_names_its_template_family(dataset: dict) -> None:
    seen = set()
    for r in dataset["refs"]:
        n = 0 if r["no_target"] else len(r["ann_id"])
        for s in r["sentences"]:
            assert s["kind"] in _expected_kind(s["sent"], r["no_target"], n), s
            seen.add(s["kind"])
    assert {"color-shape", "shape", "size", "position", "extreme", "plural"} <= seen
    assert any(k.startswith("absent-") for k in seen)


def test_case_mix_and_target_counts(dataset: dict) -> None:
    s = dataset["summary"]
    total = s["sentences"]
    assert 0.42 <= s["single"] / total <= 0.58
    assert 0.22 <= s["multi"] / total <= 0.38
    assert 0.14 <= s["no-target"] / total <= 0.26
    for r in dataset["refs"]:
        n = len(r["sentences"])
        if r["no_target"]:
            assert r["ann_id"] == [-1] and r["category_id"] == []
        else:
            assert len(r["ann_id"]) == len(r["category_id"]) >= 1
        assert r["sent_ids"] == [x["sent_id"] for x in r["sentences"]] and n >= 1
    multi = [r for r in dataset["refs"] if len(r["ann_id"]) >= 2]
    assert multi and all(len(set(r["ann_id"])) == len(r["ann_id"]) for r in multi)


def test_partly_visible_objects_are_never_mentioned() -> None:
    """A moving camera can cut objects; expressions must then avoid their attributes."""
    i = next(
        i for i in range(50) if len(sample_scene(np.random.default_rng([SEED, i])).objects) > 3
    )
    scene, _, masks = _scene(i)
    cut = [m.copy() for m in masks]
    ys, xs = np.nonzero(cut[0])
    # Keep the lower-right part of object 0 only (about a third of it), as a frame border would.
    cut[0][: (ys.min() + ys.max()) // 2] = False
    cut[0][:, : xs.min() + (xs.max() - xs.min()) // 3] = False
    frac = cut[0].sum() / masks[0].sum()
    assert 0.1 < frac < 0.45
    exprs = sample_expressions(scene, cut, np.random.default_rng(0), 50)
    hidden = scene.objects[0]
    for e in exprs:
        q = _parse(e.sentence)
        mentions = (q["color"] in (None, hidden.color)) and q["shape"] in ("shape", hidden.shape)
        assert not mentions, e.sentence


def test_sample_expressions_respects_k_and_weights() -> None:
    scene, _, masks = _scene(4)
    assert len(sample_expressions(scene, masks, np.random.default_rng(0), 3)) <= 3
    only_neg = sample_expressions(
        scene, masks, np.random.default_rng(0), 4, case_weights={"no-target": 1.0}
    )
    assert only_neg and all(e.case == "no-target" and e.target_ids == [] for e in only_neg)
    sentences = [e.sentence for e in sample_expressions(scene, masks, np.random.default_rng(0), 40)]
    assert len(sentences) == len(set(sentences))


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def test_cli_writes_dataset_and_prints_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "set"
    argv = ["synth", "--out", str(out), "--n", "3", "--seed", "2", "--split", "val"]
    assert cli_main.main([*argv, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "single" in text and "multi" in text and "no-target" in text
    refs = json.loads((out / "grefs(unc).json").read_text())
    assert refs and {r["split"] for r in refs} == {"val"}
    assert cli_main.main([*argv, "--no-progress"]) == 2  # refuses to overwrite silently


def test_scene_spec_json_round_trip() -> None:
    scene, image, _ = _scene(7)
    again = SceneSpec.from_dict(json.loads(json.dumps(scene.to_dict())))
    assert again == scene
    assert np.array_equal(render(again)[0], image)
