"""gRefCOCO loader and COCO mask decoding (polygons, uncompressed and compressed RLE)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gsva_ros.data.grefcoco import (
    GRefCOCOError,
    compress_counts,
    decode_polygons,
    decode_rle,
    decode_segmentation,
    decompress_counts,
    encode_rle,
    group_by_image,
    load_grefcoco,
)
from gsva_ros.data.synth import generate_dataset

# 3x4 mask; column-major: col0 000, col1 110, col2 011, col3 000 -> runs 3, 2, 2, 2, 3
SMALL = np.array([[0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]], dtype=bool)
SMALL_COUNTS = [3, 2, 2, 2, 3]


# ------------------------------------------------------------------------------------------
# RLE
# ------------------------------------------------------------------------------------------


def test_uncompressed_rle_is_column_major() -> None:
    rle = encode_rle(SMALL)
    assert rle == {"size": [3, 4], "counts": SMALL_COUNTS}
    assert np.array_equal(decode_rle({"size": [3, 4], "counts": SMALL_COUNTS}), SMALL)


def test_rle_starting_with_foreground_has_empty_first_run() -> None:
    mask = np.ones((2, 2), dtype=bool)
    assert encode_rle(mask)["counts"] == [0, 4]
    assert decode_rle({"size": [2, 2], "counts": [0, 4]}).all()


@pytest.mark.parametrize(
    ("counts", "text"),
    [
        # small values are one character each (value + 48); from the 4th on, deltas to i-2
        (SMALL_COUNTS, "32201"),
        # 2 - 10 = -8: low 5 bits 0b11000 (sign bit 0x10 set), nothing left -> chr(48 + 24)
        ([5, 10, 3, 2], "5:3H"),
        # 100 = 0b11_00100: low group 4 with the continuation bit (4 + 32 + 48 = 'T'), then 3
        ([100], "T3"),
    ],
)
def test_compressed_counts_known_strings(counts: list[int], text: str) -> None:
    assert compress_counts(counts) == text
    assert decompress_counts(text) == counts
    assert decompress_counts(text.encode()) == counts


def test_compressed_rle_decodes_to_mask() -> None:
    assert np.array_equal(decode_rle({"size": [3, 4], "counts": "32201"}), SMALL)
    assert np.array_equal(decode_rle({"size": [3, 4], "counts": b"32201"}), SMALL)


def test_malformed_rle_is_rejected() -> None:
    with pytest.raises(ValueError, match="sum"):
        decode_rle({"size": [3, 4], "counts": [3, 2]})
    with pytest.raises(ValueError, match="middle"):
        decompress_counts("T")  # continuation bit set on the last character
    with pytest.raises(ValueError, match="size"):
        decode_rle({"counts": [1]})


@settings(max_examples=150, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 24), st.integers(1, 24))))
def test_rle_round_trip(mask: np.ndarray) -> None:
    for compressed in (False, True):
        rle = encode_rle(mask, compressed=compressed)
        assert rle["size"] == list(mask.shape)
        assert np.array_equal(decode_rle(rle), mask)
    counts = encode_rle(mask)["counts"]
    assert sum(counts) == mask.size
    assert all(c > 0 for c in counts[1:])  # only the first (background) run may be empty


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 10**7), max_size=40))
def test_counts_compression_round_trip(counts: list[int]) -> None:
    text = compress_counts(counts)
    assert all(48 <= ord(ch) < 112 for ch in text)  # printable ASCII, JSON-safe
    assert decompress_counts(text) == counts


# ------------------------------------------------------------------------------------------
# Polygons and segmentation dispatch
# ------------------------------------------------------------------------------------------


def test_polygon_rectangle_is_exact() -> None:
    # Pixel (r, c) covers [c, c+1) x [r, r+1): the box x 2..7, y 3..8 is columns 2-6, rows 3-7.
    mask = decode_polygons([[2, 3, 7, 3, 7, 8, 2, 8]], 12, 12)
    expected = np.zeros((12, 12), dtype=bool)
    expected[3:8, 2:7] = True
    assert np.array_equal(mask, expected)


def test_polygon_half_covered_pixels() -> None:
    # Edge at x = 4.6 covers 60 % of column 4 (kept), edge at y = 6.4 covers 40 % of row 6.
    mask = decode_polygons([[1, 1, 4.6, 1, 4.6, 6.4, 1, 6.4]], 8, 8)
    expected = np.zeros((8, 8), dtype=bool)
    expected[1:6, 1:5] = True
    assert np.array_equal(mask, expected)


def test_polygon_triangle_matches_centre_test() -> None:
    h = w = 64
    tri = np.array([[5.0, 5.0], [60.0, 12.0], [20.0, 58.0]])
    mask = decode_polygons([tri.ravel().tolist()], h, w)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5

    def side(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return (q[0] - p[0]) * (yy - p[1]) - (q[1] - p[1]) * (xx - p[0])

    s = [side(tri[i], tri[(i + 1) % 3]) for i in range(3)]
    inside = ((s[0] > 0) & (s[1] > 0) & (s[2] > 0)) | ((s[0] < 0) & (s[1] < 0) & (s[2] < 0))
    assert abs(int(mask.sum()) - int(inside.sum())) <= 3
    assert (mask != inside).sum() <= 0.05 * inside.sum()  # differences only on the boundary


def test_degenerate_polygons_are_dropped_and_union_taken() -> None:
    polys = [[1, 1, 3, 1, 3, 3, 1, 3], [5, 5, 7, 7], [6, 0, 8, 0, 8, 2, 6, 2]]
    mask = decode_segmentation(polys, 10, 10)
    assert mask.sum() == 4 + 4
    assert not decode_segmentation([[1, 1, 5, 5]], 10, 10).any()


def test_segmentation_dispatch_and_size_check() -> None:
    assert np.array_equal(decode_segmentation(encode_rle(SMALL), 3, 4), SMALL)
    rles = [encode_rle(SMALL, compressed=True), encode_rle(np.eye(3, 4, dtype=bool))]
    assert np.array_equal(decode_segmentation(rles, 3, 4), SMALL | np.eye(3, 4, dtype=bool))
    with pytest.raises(ValueError, match="does not match"):
        decode_segmentation(encode_rle(SMALL), 4, 3)
    with pytest.raises(ValueError, match="unsupported"):
        decode_segmentation("oops", 3, 4)


# ------------------------------------------------------------------------------------------
# Loader on a hand-made file (every encoding, no target, multi target)
# ------------------------------------------------------------------------------------------


def _write(root: Path, refs: object, instances: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "grefs(unc).json").write_text(json.dumps(refs))
    (root / "instances.json").write_text(json.dumps(instances))
    return root


def _handmade(root: Path) -> tuple[Path, dict[int, np.ndarray]]:
    h, w = 10, 12
    a = np.zeros((h, w), bool)
    a[2:5, 1:4] = True  # polygon below
    b = np.zeros((h, w), bool)
    b[6:9, 7:11] = True
    b[0, 0] = True
    c = np.zeros((h, w), bool)
    c[1:3, 8:12] = True
    instances = {
        "images": [
            {"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "height": h, "width": w}
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "segmentation": [[1, 2, 4, 2, 4, 5, 1, 5], [0, 0, 1, 1]]},
            {"id": 2, "image_id": 7, "segmentation": encode_rle(b)},
            {"id": 3, "image_id": 7, "segmentation": encode_rle(c, compressed=True)},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }

    def sent(i: int, text: str) -> dict:
        return {"sent_id": i, "sent": text, "raw": text, "tokens": text.split()}

    refs = [
        {
            "ref_id": 0,
            "image_id": 7,
            "file_name": "COCO_train2014_000000000007_1.jpg",
            "split": "val",
            "ann_id": [1],
            "category_id": [1],
            "sent_ids": [0, 1],
            "sentences": [sent(0, "the left thing"), sent(1, " the small thing ")],
        },
        {
            "ref_id": 1,
            "image_id": 7,
            "file_name": "x.jpg",
            "split": "val",
            "ann_id": [2, 3],
            "category_id": [1, 1],
            "sent_ids": [2],
            "sentences": [sent(2, "both things")],
        },
        {
            "ref_id": 2,
            "image_id": 7,
            "file_name": "x.jpg",
            "split": "testA",
            "ann_id": [-1],
            "category_id": [],
            "sent_ids": [3],
            "sentences": [sent(3, "the purple cat")],
            "no_target": True,
        },
    ]
    return _write(root, refs, instances), {0: a, 1: b | c, 2: np.zeros((h, w), bool)}


def test_loader_decodes_every_encoding(tmp_path: Path) -> None:
    root, gt = _handmade(tmp_path / "g")
    samples = load_grefcoco(root)
    assert [s.sentence for s in samples] == [
        "the left thing",
        "the small thing",
        "both things",
        "the purple cat",
    ]
    assert [s.case for s in samples] == ["single", "single", "multi", "no-target"]
    assert samples[2].ann_ids == (2, 3) and samples[3].ann_ids == () and samples[3].no_target
    for s in samples:
        assert (s.height, s.width) == (10, 12)
        mask = s.load_mask()
        assert mask.dtype == bool and np.array_equal(mask, gt[s.ref_id]), s.sentence
    # Image file name comes from instances.json, not the per-ref suffixed name.
    assert samples[0].image_path == root / "images" / "COCO_train2014_000000000007.jpg"
    assert all(s.kind is None for s in samples)  # real gRefCOCO names no template family


def test_loader_split_and_image_dir(tmp_path: Path) -> None:
    root, _ = _handmade(tmp_path / "g")
    assert [s.ref_id for s in load_grefcoco(root, split="val")] == [0, 0, 1]
    assert [s.ref_id for s in load_grefcoco(root, split="testA")] == [2]
    assert load_grefcoco(root, split="train") == []
    other = tmp_path / "coco" / "train2014"
    s = load_grefcoco(root, image_dir=other)[0]
    assert s.image_path == other / "COCO_train2014_000000000007.jpg"


def test_group_by_image_keeps_order() -> None:
    from gsva_ros.data.grefcoco import RefSample

    def mk(image_id: int, ref_id: int) -> RefSample:
        return RefSample(ref_id, ref_id, image_id, Path("x"), "s", (), True, "no-target", 1, 1)

    groups = group_by_image([mk(5, 0), mk(3, 1), mk(5, 2)])
    assert list(groups) == [5, 3]
    assert [s.ref_id for s in groups[5]] == [0, 2]


def test_loader_on_generated_dataset(tmp_path: Path) -> None:
    root = tmp_path / "synth"
    summary = generate_dataset(root, 5, 11, split="val", progress=False)
    samples = load_grefcoco(root, split="val")
    assert len(samples) == summary["sentences"]
    for case in ("single", "multi", "no-target"):
        assert sum(s.case == case for s in samples) == summary[case]
    inst = json.loads((root / "instances.json").read_text())
    ann_masks = {a["id"]: decode_rle(a["segmentation"]) for a in inst["annotations"]}
    for s in samples:
        assert s.image_path.is_file()
        mask = s.load_mask()
        assert mask.shape == (s.height, s.width)
        expected = np.zeros_like(mask)
        for a in s.ann_ids:
            expected |= ann_masks[a]
        assert np.array_equal(mask, expected)
        assert mask.any() != s.no_target
        assert (len(s.ann_ids) >= 2) == (s.case == "multi")
        assert s.kind and s.kind.startswith("absent-") == s.no_target
    assert len(group_by_image(samples)) == 5


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_pickle_is_refused_without_being_read(tmp_path: Path) -> None:
    root = tmp_path / "g"
    root.mkdir()
    # Not a valid pickle: if the loader tried to unpickle it, it would fail differently.
    (root / "grefs(unc).p").write_bytes(b"\x80\x04 definitely not loaded")
    (root / "instances.json").write_text("{}")
    with pytest.raises(GRefCOCOError, match=r"pickle.*JSON"):
        load_grefcoco(root)
    with pytest.raises(GRefCOCOError, match="pickle"):
        load_grefcoco(root / "grefs(unc).p")


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"grefs\(unc\)\.json"):
        load_grefcoco(tmp_path)
    (tmp_path / "grefs(unc).json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="instances.json"):
        load_grefcoco(tmp_path)


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    root, _ = _handmade(tmp_path / "g")
    (root / "grefs(unc).json").write_text('[{"ref_id": 0,')
    with pytest.raises(GRefCOCOError, match=r"grefs\(unc\)\.json: invalid JSON at line 1"):
        load_grefcoco(root)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda refs, inst: refs[1].update(ann_id=[2, 99]), "ann_id 99 not in instances.json"),
        (lambda refs, inst: refs[0].update(image_id=8), "image_id 8 not in instances.json"),
        (lambda refs, inst: refs[2].pop("sentences"), r"refs\[2\]: needs"),
        (lambda refs, inst: refs[2].update(ann_id=[-1, 3]), "mixes -1"),
        (lambda refs, inst: inst.pop("annotations"), "missing list 'annotations'"),
        (lambda refs, inst: inst["images"][0].pop("height"), r"images\[0\]"),
        (lambda refs, inst: refs[1]["sentences"][0].update(kind=3), r"sentences\[0\]: 'kind'"),
        (lambda refs, inst: refs[0]["sentences"][1].update(kind=" "), r"sentences\[1\]: 'kind'"),
    ],
)
def test_schema_errors_are_clear(tmp_path: Path, mutate, message: str) -> None:
    root, _ = _handmade(tmp_path / "g")
    refs = json.loads((root / "grefs(unc).json").read_text())
    inst = json.loads((root / "instances.json").read_text())
    mutate(refs, inst)
    _write(root, refs, inst)
    with pytest.raises(GRefCOCOError, match=message):
        load_grefcoco(root)


def test_refs_must_be_a_list(tmp_path: Path) -> None:
    root, _ = _handmade(tmp_path / "g")
    (root / "grefs(unc).json").write_text('{"refs": []}')
    with pytest.raises(GRefCOCOError, match="expected a list of refs"):
        load_grefcoco(root)


def test_polygon_coverage_is_area_fraction() -> None:
    from gsva_ros.data.grefcoco import polygon_coverage

    # Box x 2.25..7.5, y 3..8: left column 3/4 covered, right column half covered.
    y0, x0, cover = polygon_coverage([[2.25, 3, 7.5, 3, 7.5, 8, 2.25, 8]], 12, 12, supersample=4)
    assert (y0, x0, cover.shape) == (3, 2, (5, 6))
    assert np.allclose(cover[:, 0], 0.75) and np.allclose(cover[:, 1:5], 1.0)
    assert np.allclose(cover[:, 5], 0.5)
    # Two triangles sharing the diagonal never double-count it: coverage sums to the square.
    _, _, a = polygon_coverage([[0, 0, 8, 0, 8, 8]], 8, 8)
    _, _, b = polygon_coverage([[0, 0, 8, 8, 0, 8]], 8, 8)
    assert np.allclose(a + b, 1.0)
