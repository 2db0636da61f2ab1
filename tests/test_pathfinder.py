"""Pathfinder / Path-X: the release's text metadata, exact pixel tokens, empty and corrupt PNGs, the
seeded 80/10/10 split, generation when missing, folder names per setting, and the official configs."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lra_dtn.config import Preset
from lra_dtn.data import DataError, collate
from models import build_model
from tasks import TASKS
from tasks.pathfinder import (OFFICIAL_NUM_IMAGES, PathfinderData, metadata_files, pixels, read_metadata,
                              split_indices)

DIFFICULTY = "curv_contour_length_14"


def write_release(root: Path, images: list[np.ndarray | None], labels: list[int], per_batch: int = 5) -> Path:
    """A difficulty folder in the release layout: ``imgs/<b>/sample_<i>.png`` and text ``metadata/<b>.npy``
    with the generator's 11 fields. ``None`` writes an empty (zero-byte) PNG."""
    folder = root / "pathfinder32" / DIFFICULTY
    (folder / "metadata").mkdir(parents=True)
    for batch in range(math.ceil(len(images) / per_batch)):
        lines = []
        for i in range(per_batch):
            k = batch * per_batch + i
            if k >= len(images):
                break
            path = folder / "imgs" / str(batch) / f"sample_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            if images[k] is None:
                path.write_bytes(b"")
            else:
                Image.fromarray(images[k]).save(path)
            lines.append(f"imgs/{batch} sample_{i}.png {i} {labels[k]} 1.0 14 4 2 0.5 1 1\n")
        (folder / "metadata" / f"{batch}.npy").write_text("".join(lines))
    return folder


def constant_images(count: int) -> list[np.ndarray]:
    """Image ``k`` is filled with the level ``k``, so a token tells which image it came from."""
    return [np.full((32, 32), k, dtype=np.uint8) for k in range(count)]


def test_exact_pixel_tokens_in_raster_order(tmp_path):
    image = ((np.arange(32)[:, None] * 7 + np.arange(32)[None, :] * 3) % 256).astype(np.uint8)
    image[0, 1], image[1, 0], image[31, 30] = 11, 200, 0
    folder = write_release(tmp_path, [image], [1])
    tokens = pixels(folder / "imgs" / "0" / "sample_0.png", 32)
    assert tokens.dtype == np.uint8 and tokens.shape == (1024,)
    # Row-major: token 32*r + c is pixel (r, c); a transposed reading would put 200 at 1.
    assert (tokens[1], tokens[32], tokens[1022]) == (11, 200, 0)
    np.testing.assert_array_equal(tokens, image.reshape(-1))
    with pytest.raises(DataError, match=r"sample_0\.png: expected an 8-bit grayscale \(mode L\) 64x64"):
        pixels(folder / "imgs" / "0" / "sample_0.png", 64)


def test_text_metadata_empty_png_skipped_and_split(tmp_path, capsys):
    images = constant_images(21)
    images[7] = None  # the release has such files (S4 blacklists pathfinder32/curv_baseline/imgs/0/sample_172.png)
    labels = [k % 2 for k in range(21)]
    write_release(tmp_path, images, labels)
    options = PathfinderData(split_seed=3)
    splits = TASKS.get("pathfinder")().load(tmp_path, options, tmp_path / "cache")
    assert "skipped 1 empty PNG" in capsys.readouterr().out
    # 20 readable images -> 16/2/2; each image's level (its index) comes back with its own label.
    assert {k: len(v) for k, v in splits.items()} == {"train": 16, "val": 2, "test": 2}
    seen = []
    for split in splits.values():
        for row in split:
            level = int(row["input_ids"][0])
            assert (row["input_ids"] == level).all() and len(row["input_ids"]) == 1024
            assert row["label"] == labels[level]
            seen.append(level)
    assert sorted(seen) == [k for k in range(21) if k != 7]
    # The split is numpy default_rng(split_seed).permutation over the 20 kept images in metadata order.
    kept = [k for k in range(21) if k != 7]
    expected = split_indices(20, 3)
    for split, indices in expected.items():
        assert [int(r["input_ids"][0]) for r in splits[split]] == [kept[i] for i in indices]


def test_empty_png_message_names_file_and_line(tmp_path, capsys):
    images = constant_images(12)
    images[7] = None
    write_release(tmp_path, images, [0] * 12)
    TASKS.get("pathfinder")().load(tmp_path, PathfinderData(), tmp_path / "cache")
    out = capsys.readouterr().out
    assert "skipped 1 empty PNG(s)" in out and re.search(r"imgs/1/sample_2\.png \(.*metadata/1\.npy:3\)", out)


def test_split_sizes_and_determinism():
    sizes = {k: len(v) for k, v in split_indices(200_000, 0).items()}
    assert sizes == {"train": 160_000, "val": 20_000, "test": 20_000}  # the official TRAIN/VALID_EXAMPLES
    assert {k: len(v) for k, v in split_indices(8000, 0).items()} == {"train": 6400, "val": 800, "test": 800}
    a, b, c = split_indices(1000, 0), split_indices(1000, 0), split_indices(1000, 1)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert not np.array_equal(a["train"], c["train"])
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(1000))


def test_metadata_files_in_batch_order_and_text_parsing(tmp_path):
    folder = tmp_path / DIFFICULTY
    (folder / "metadata").mkdir(parents=True)
    for b in (10, 2, 1):
        (folder / "metadata" / f"{b}.npy").write_text(f"imgs/{b} sample_0.png 0 {b % 2} 1.0 14 4 2 0.5 1 1\n")
    assert [p.name for p in metadata_files(folder)] == ["1.npy", "2.npy", "10.npy"]
    # split('\n')[:-1]: a final line without its newline is dropped, as in the official reader.
    (folder / "metadata" / "2.npy").write_text("imgs/2 sample_0.png 0 1 x\nimgs/2 sample_1.png 1 0 x")
    entries = read_metadata(folder, metadata_files(folder))
    assert [(e.path.relative_to(folder).as_posix(), e.label) for e in entries] == [
        ("imgs/1/sample_0.png", 1), ("imgs/2/sample_0.png", 1), ("imgs/10/sample_0.png", 0)]


@pytest.mark.parametrize("line", ["imgs/0 sample_1.png 1\n", "imgs/0 sample_1.png 1 2 1.0\n",
                                  "imgs/0\tsample_1.png\t1\t0\n", "\n"])
def test_malformed_metadata_line_names_file_and_line(tmp_path, line):
    folder = write_release(tmp_path, constant_images(12), [0] * 12)
    meta = folder / "metadata" / "1.npy"
    rows = meta.read_text().splitlines(keepends=True)
    meta.write_text("".join(rows[:3] + [line] + rows[3:]))
    with pytest.raises(DataError, match=rf"{re.escape(str(meta))}:4: expected"):
        TASKS.get("pathfinder")().load(tmp_path, PathfinderData(), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_corrupt_or_missing_png_names_the_file(tmp_path):
    folder = write_release(tmp_path, constant_images(12), [0] * 12)
    task, cache = TASKS.get("pathfinder")(), tmp_path / "cache"
    png = folder / "imgs" / "2" / "sample_0.png"
    good = png.read_bytes()
    png.write_bytes(good[:40])  # non-empty, truncated
    with pytest.raises(DataError, match=rf"{re.escape(str(png))}: not a readable PNG"):
        task.load(tmp_path, PathfinderData(), cache)
    png.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=rf"{re.escape(str(png))}: not a readable PNG"):
        task.load(tmp_path, PathfinderData(), cache)
    png.unlink()
    with pytest.raises(DataError, match=rf"metadata/2\.npy:1: lists {re.escape(str(png))}, which does not exist"):
        task.load(tmp_path, PathfinderData(), cache)
    assert list(cache.iterdir()) == []
    png.write_bytes(good)
    assert len(task.load(tmp_path, PathfinderData(), cache)["train"]) == 10


def test_existing_folder_without_metadata_names_the_expected_files(tmp_path):
    folder = tmp_path / "pathfinder32" / DIFFICULTY
    (folder / "metadata").mkdir(parents=True)
    with pytest.raises(DataError, match=rf"no metadata files {re.escape(str(folder))}/metadata/\*\.npy: expected the "
                                        r"LRA release's lra_release/lra_release/pathfinder32/curv_contour_length_14"):
        TASKS.get("pathfinder")().source_files(tmp_path, PathfinderData())
    small = PathfinderData(num_images=3000)
    gen = tmp_path / small.folder
    (gen / "metadata").mkdir(parents=True)
    (gen / "metadata" / "0.npy").write_text("")
    with pytest.raises(DataError, match=r"incomplete: 1 of 3 metadata files; expected 3000 images generated with seed 0"):
        TASKS.get("pathfinder")().source_files(tmp_path, small)


def test_folder_names_keep_generated_sets_apart():
    assert PathfinderData().folder == "pathfinder32/curv_contour_length_14"
    assert PathfinderData(image_size=128).folder == "pathfinder128/curv_contour_length_14"
    assert PathfinderData(num_images=8000).folder == "pathfinder32-gen-n8000-seed0/curv_contour_length_14"
    assert PathfinderData(seed=1).folder == f"pathfinder32-gen-n{OFFICIAL_NUM_IMAGES}-seed1/curv_contour_length_14"
    assert PathfinderData(num_images=50, contour_length=6).folder == "pathfinder32-gen-n50-seed0/curv_baseline"
    # An easier variant with its own distractor count is never the release's folder.
    easy = PathfinderData(contour_length=6, distractors=0)
    assert easy.folder == f"pathfinder32-gen-n{OFFICIAL_NUM_IMAGES}-seed0-distractors0/curv_baseline"
    with pytest.raises(ValueError, match="distractors must be >= 0"):
        PathfinderData(distractors=-1)
    assert not easy.official and easy.params.num_distractor_snakes == 0
    assert PathfinderData(contour_length=6).params.num_distractor_snakes == 10  # LRA's: 20 // (6 // 3)
    # The split seed and the mask option change the cache key but not the images.
    assert PathfinderData(split_seed=5, mask_zero_tokens=True).folder == PathfinderData().folder
    with pytest.raises(DataError, match="no Pathfinder preset for image_size 48"):
        PathfinderData(image_size=48).folder


def test_an_edited_png_rebuilds_the_cache(tmp_path):
    """The images are part of the cache key, not only the metadata that lists them."""
    write_release(tmp_path / "data", constant_images(20), [k % 2 for k in range(20)])
    task, options = TASKS.get("pathfinder")(), PathfinderData()
    before = task.load(tmp_path / "data", options, tmp_path / "cache")
    assert sorted(int(r[0]) for s in before.values() for r in s["input_ids"]) == list(range(20))
    path = tmp_path / "data" / "pathfinder32" / DIFFICULTY / "imgs" / "0" / "sample_0.png"
    Image.fromarray(np.full((32, 32), 99, dtype=np.uint8)).save(path)  # image 0 now holds 99s
    after = task.load(tmp_path / "data", options, tmp_path / "cache")
    assert sorted(int(r[0]) for s in after.values() for r in s["input_ids"]) == [*range(1, 20), 99]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """80 images generated on demand through the task (the cpu/smoke path on a fresh machine)."""
    root = tmp_path_factory.mktemp("pf")
    options = PathfinderData(num_images=80, seed=5)
    task = TASKS.get("pathfinder")()
    task.prepare(root / "data", options)
    return task, root, options, task.load(root / "data", options, root / "cache")


def test_generated_when_missing_and_read_back(generated, capsys):
    task, root, options, splits = generated
    folder = root / "data" / "pathfinder32-gen-n80-seed5" / DIFFICULTY
    assert [p.name for p in metadata_files(folder)] == ["0.npy"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert {k: len(v) for k, v in splits.items()} == {"train": 64, "val": 8, "test": 8}
    labels = np.concatenate([np.asarray(s["label"]) for s in splits.values()])
    assert 0.3 < labels.mean() < 0.7  # i.i.d. fair labels: 80 draws, 3.5 sd either side
    first = (folder / "metadata" / "0.npy").read_text().split("\n")[0].split(" ")
    image = np.asarray(Image.open(folder / first[0] / first[1]))
    rows = [np.asarray(r) for s in splits.values() for r in s["input_ids"]]
    assert any(np.array_equal(r, image.reshape(-1)) for r in rows)
    assert all(r.shape == (1024,) and r.min() == 0 and r.max() == 255 for r in rows)  # min-max scaled PNGs
    assert task.describe(options) == ("Pathfinder-32 generated pathfinder32-gen-n80-seed5/curv_contour_length_14: "
                                      "80 images (seed 5), split 64/8/8 with seed 0, pixel 0 a real token")
    task.prepare(root / "data", options)  # second time: nothing generated, the same cache
    task.load(root / "data", options, root / "cache")
    assert "generating" not in capsys.readouterr().out
    assert len(list((root / "cache").iterdir())) == 1


def test_a_folder_from_an_older_generator_is_refused(generated, tmp_path):
    """Version 1 drew denser images (seeds ignored cv2.dilate's border): its folders must not be read as
    today's, and neither may a folder generated with other parameters under the same name."""
    task, root, options, _ = generated
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    record = data / options.folder / "generated.json"
    old = json.loads(record.read_text())
    record.write_text(json.dumps({key: value for key, value in old.items() if key != "generator_version"}))
    with pytest.raises(DataError, match=r"other generator_version .*version 1, now 2\): delete"):
        task.load(data, options, tmp_path / "cache")
    record.write_text(json.dumps({**old, "params": {**old["params"], "opencv_seed_border": False}}))
    with pytest.raises(DataError, match="other params than these options give"):
        task.load(data, options, tmp_path / "cache")


def test_end_to_end_smoke_and_zero_mask(generated):
    task, root, options, splits = generated
    cfg, train_cfg, smoke = task.spec(Preset.smoke, "transformer")
    assert (cfg.vocab_size, cfg.num_classes, cfg.max_len) == (256, 2, 1024) and not smoke.mask_zero_tokens
    batch = collate(splits["train"], np.arange(4), smoke.mask_zero_tokens)
    assert batch.ids.shape == (4, 1024) and batch.mask.all()
    torch.manual_seed(0)
    net = build_model("transformer", cfg, "ln")
    logits = net(*batch.inputs())
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()
    quirk = collate(splits["train"], np.arange(4), mask_zero_tokens=True)
    assert torch.equal(quirk.mask, batch.ids != 0) and 0.3 < (~quirk.mask).float().mean() < 0.95
    assert "pixel 0 masked as padding" in task.describe(PathfinderData(mask_zero_tokens=True))


def test_pathx_generates_128_pixel_images(tmp_path):
    task = TASKS.get("pathx")()
    cfg, _, options = task.spec(Preset.smoke, "transformer")
    assert options == PathfinderData(image_size=128, num_images=10)
    task.prepare(tmp_path / "data", options)
    splits = task.load(tmp_path / "data", options, tmp_path / "cache")
    assert (tmp_path / "data" / "pathfinder128-gen-n10-seed0" / DIFFICULTY / "metadata" / "0.npy").exists()
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "val": 1, "test": 1}
    assert len(splits["train"][0]["input_ids"]) == 128 * 128 == cfg.max_len
    assert task.describe(PathfinderData(image_size=128)).startswith(
        "Path-X (Pathfinder-128) pathfinder128/curv_contour_length_14 (the LRA release")


def test_official_configs():
    pf, px = TASKS.get("pathfinder")(), TASKS.get("pathx")()
    shapes = {"transformer": (4, 32, 16, 32, 4, 0.2), "bigbird": (4, 64, 32, 64, 2, 0.2),
              "reformer": (2, 64, 32, 64, 8, 0.2)}
    for model, shape in shapes.items():
        cfg, train, options = pf.spec(Preset.official, model)
        assert (cfg.num_layers, cfg.emb_dim, cfg.qkv_dim, cfg.mlp_dim, cfg.num_heads, cfg.dropout) == shape
        assert (cfg.vocab_size, cfg.num_classes, cfg.max_len, cfg.attn_dropout) == (256, 2, 1024, 0.1)
        assert (cfg.pooling, cfg.pos_emb) == ("mean", "sinusoidal")
        assert (train.batch_size, train.steps, train.lr, train.schedule, train.warmup, train.weight_decay,
                train.grad_clip, train.eval_every) == (512, 62_400, 1e-3, "cosine", 312, 0.0, None, 312)
        assert options == PathfinderData() and options.folder == "pathfinder32/curv_contour_length_14"
    assert pf.spec(Preset.official, "bigbird")[0].block_size == 64
    for model in ("transformer", "bigbird", "reformer"):  # no official BigBird/Reformer Path-X config
        cfg, train, options = px.spec(Preset.official, model)
        assert (cfg.num_layers, cfg.emb_dim, cfg.qkv_dim, cfg.mlp_dim, cfg.num_heads) == (1, 32, 16, 32, 2)
        assert (cfg.max_len, cfg.pooling, cfg.pos_emb, cfg.dropout, cfg.attn_dropout) == (16384, "mean", "learned",
                                                                                            0.1, 0.1)
        assert (train.batch_size, train.steps, train.warmup, train.grad_clip, train.eval_every) == (
            64, 500_000, 2500, 1.0, 2500)
        assert options.folder == "pathfinder128/curv_contour_length_14"
    for task in (pf, px):
        for preset in (Preset.cpu, Preset.smoke):
            cfg, train, options = task.spec(preset, "transformer")
            assert not options.official and cfg.max_len == options.image_size ** 2
            assert train.batch_size <= options.num_images * 8 // 10  # one batch fits the train split
