"""The Pathfinder generator: files and metadata as the LRA loaders read them, reproducibility, and the
geometry and statistics of the original generator (spec §5)."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

import tasks.pathfinder_generator as pg
from benchmarks.pathfinder import ORIGINAL_PF32, marker_peak


@pytest.fixture(scope="module")
def pf32_samples():
    rng = pg.batch_rng(123, 0)
    return [pg.sample_image(rng, pg.PF32) for _ in range(120)]


@pytest.fixture(scope="module")
def pf32_easy_samples():
    rng = pg.batch_rng(123, 0)
    return [pg.sample_image(rng, pg.pf32(6)) for _ in range(150)]


def read_metadata(folder):
    """What LRA's Pathfinder32._build_pcollection does: text, split('\\n')[:-1], split(' ')."""
    rows = []
    for path in sorted((folder / "metadata").glob("*.npy")):
        rows += [line.split(" ") for line in path.read_bytes().decode("utf-8").split("\n")[:-1]]
    return rows


def test_presets_follow_lra():
    assert (pg.PF32.image_size, pg.PF32.contour_length, pg.PF32.distractor_length,
            pg.PF32.num_distractor_snakes, pg.PF32.seed_distance, pg.PF32.paddle_margin_list) == (32, 14, 4, 5, 7, (1,))
    assert pg.pf32() == pg.PF32 == pg.PathfinderParams()
    assert (pg.PF128.image_size, pg.PF128.num_distractor_snakes, pg.PF128.paddle_margin_list,
            pg.PF128.paddle_length, pg.PF128.antialias_scale) == (128, 8, (2, 3), 5, 2)
    assert pg.pf32(9).distractor_length == 3 and pg.pf32(9).num_distractor_snakes == 6
    assert pg.PF32.difficulty == "curv_contour_length_14" and pg.pf32(6).difficulty == "curv_baseline"
    with pytest.raises(ValueError, match="break even"):
        replace(pg.PF32, paddle_thickness=0.75)


def test_layout_and_metadata_format(tmp_path):
    folder = pg.generate(tmp_path / "pathfinder32", num_images=7, seed=3, images_per_batch=3)
    assert folder == tmp_path / "pathfinder32" / "curv_contour_length_14"
    assert sorted(p.name for p in (folder / "metadata").iterdir()) == ["0.npy", "1.npy", "2.npy"]
    text = (folder / "metadata" / "1.npy").read_text()
    assert text.endswith("\n") and text.count("\n") == 3
    rows = read_metadata(folder)
    assert len(rows) == 7
    for row in rows:
        assert len(row) == 11
        batch, index = int(row[0].split("/")[1]), int(row[2])
        assert row[0] == f"imgs/{batch}" and row[1] == f"sample_{index}.png"
        assert row[3] in ("0", "1")
        assert row[4:] == ["1.0", "14", "4", "2", "0.5", "1", "1"]
        image = Image.open(folder / row[0] / row[1])
        assert image.mode == "L" and image.size == (32, 32)
        array = np.asarray(image)
        assert array.dtype == np.uint8 and array.min() == 0 and array.max() == 255  # min-max scaled
    assert [r[2] for r in rows] == ["0", "1", "2", "0", "1", "2", "0", "1", "2"][:7]
    with pytest.raises(FileExistsError):
        pg.generate(tmp_path / "pathfinder32", num_images=3, seed=3, images_per_batch=3)


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    a = pg.generate(tmp_path / "a", num_images=6, seed=11, images_per_batch=3)
    b = pg.generate(tmp_path / "b", num_images=6, seed=11, images_per_batch=3, workers=2)
    c = pg.generate(tmp_path / "c", num_images=6, seed=12, images_per_batch=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 6 + 2
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".png")


def test_markers_sit_on_the_tips_the_label_says(pf32_samples):
    for s in pf32_samples:
        origin, terminal = s.targets[s.origin_snake], s.targets[s.terminal_snake]
        assert s.origin_marker == origin.origin_tip == tuple(origin.paddles[0][0])
        assert s.terminal_marker == terminal.terminal_tip == tuple(terminal.paddles[-1][1])
        assert (s.origin_snake == s.terminal_snake) == (s.label == 1)
        # the circles are drawn: the marker centres are bright
        assert s.image[s.origin_marker] > 60 and s.image[s.terminal_marker] > 60


def test_target_snakes_are_dashed_chains_seed_distance_apart(pf32_samples):
    p, gap = pg.PF32, 2 * pg.PF32.paddle_margin_list[0]
    for s in pf32_samples:
        tips = [np.array(t.origin_tip) for t in s.targets]
        assert abs(np.linalg.norm(tips[0] - tips[1]) - p.seed_distance) <= 1.0
        for snake in s.targets:
            assert len(snake.paddles) == p.contour_length
            for (near, far), (next_near, _) in zip(snake.paddles, snake.paddles[1:]):
                assert abs(math.dist(near, far) - p.paddle_length) <= 1.5
                # consecutive dashes: the gap is 2m, up to the rounding of pivots and heads
                assert gap - 2.0 <= math.dist(far, next_near) <= gap + 2.5
        for d in s.distractors:
            assert 1 <= len(d.paddles) == p.distractor_length


@pytest.mark.parametrize("params", [pg.PF32, pg.PF128], ids=["pf32", "pf128"])
def test_turns_respect_continuity(params, pf32_samples):
    """Head weights are cos(min(turn * continuity, pi/2))^2: no turn of pi / (2 * continuity) or more
    (90 degrees for PF-32, 50 for Path-X). Extension paddles carry their exact orientation."""
    samples = pf32_samples[:40] if params is pg.PF32 else [pg.sample_image(pg.batch_rng(1, 0), params)]
    limit, turns = math.pi / (2 * params.continuity), []
    for s in samples:
        for snake in s.targets + s.distractors:
            angles = [math.atan2(far[0] - near[0], far[1] - near[1]) for near, far in snake.paddles[1:]]
            turns += [abs(math.remainder(b - a, 2 * math.pi)) for a, b in zip(angles, angles[1:])]
    assert len(turns) > 20 and max(turns) < limit + 1e-9
    assert max(turns) > limit / 3  # and they do turn


@pytest.mark.parametrize("contour_length, fixture", [(14, "pf32_samples"), (6, "pf32_easy_samples")],
                         ids=["hard", "easy"])
def test_statistics_match_the_original(contour_length, fixture, request):
    """Against the original run on this machine (ORIGINAL_PF32 says how). The bands are about twice
    the spread of our statistics over 10 seeds at this sample size."""
    samples = request.getfixturevalue(fixture)
    o = ORIGINAL_PF32[contour_length]
    images = np.stack([s.image for s in samples])
    assert abs((images > 0).mean() - o["nonzero"]) <= 0.02
    assert abs(images.mean() - o["mean"]) <= 1.5
    assert abs(np.mean([len(s.distractors) for s in samples]) - o["distractors"]) <= 0.4
    assert 0.7 <= np.mean([s.target_attempts for s in samples]) / o["target_attempts"] <= 1.4
    assert abs(marker_peak(samples) - o["marker_peak"]) <= 4
    assert 0.38 <= np.mean([s.label for s in samples]) <= 0.62
    # Every seeded paddle's orientation is in -150..-121 degrees: L * (sin, cos) is in [-1.72, -1]^2,
    # so the head is the tail's up-left neighbour. Target snake 1 is seeded from snake 0, not sampled.
    for s in samples:
        for snake in (s.targets[0],) + s.distractors:
            tail, head = snake.paddles[0]
            assert (head[0] - tail[0], head[1] - tail[1]) == (-1, -1)


@pytest.mark.parametrize("size, taps, blocked", [
    (5, [(0, 0)], False),  # the anchor is a tap: every pixel reaches itself
    (5, [(1, 1)], True),  # row 4 and column 4 have no tap inside
    (5, [(1, 0), (0, 1)], True),  # each row and column is reached, but not pixel (4, 4)
    (5, [(1, -1), (-1, 1)], True),  # pixels (0, 0) and (4, 4)
    (5, [(1, 0), (-1, 0), (0, 1), (0, -1)], False),  # a cross around the anchor
    (5, [(3, 0), (-3, 0)], True),  # row 2: 2 + 3 = 5 and 2 - 3 = -1 both fall outside
    (7, [(3, 0), (-3, 0)], False),  # row 3: 3 + 3 = 6 is inside
])
def test_dilation_border_blocks_by_hand(size, taps, blocked):
    """cv2.dilate's -DBL_MAX border survives exactly in the pixels none of whose taps is inside."""
    dy, dx = np.array(taps).T
    assert pg.dilation_border_blocks(size, dy, dx) is blocked


def test_seeds_fail_exactly_where_the_original_fails():
    """The orientations at which the original can seed at all, as its own struct + cv2.dilate +
    find_available_coordinates give them (checked for all 360 orientations, every preset and margin,
    on empty and random masks, against the original code with OpenCV 5.0): PF-32 -150..-121 degrees;
    Path-X all but -59..-54 at margin 2, all at margin 3."""
    def seedable(params, margin):
        geo = pg._Geometry(params, margin)
        return [d for d in range(-180, 180) if not geo.seed_blocked(d)]

    assert seedable(pg.PF32, 1) == list(range(-150, -120))
    assert seedable(pg.PF128, 2) == [d for d in range(-180, 180) if not -59 <= d <= -54]
    assert seedable(pg.PF128, 3) == list(range(-180, 180))
    assert seedable(replace(pg.PF32, opencv_seed_border=False), 1) == list(range(-180, 180))
    geo = pg._geometry(pg.PF32, 1)
    assert geo.first_tails(0).size == 0 and geo.free_tails(geo.empty_mask, 0, 1).size == 0
    # Seedable: the tails are the free pixels, here the centre 4 x 4 less what the struct reaches.
    assert 0 < geo.first_tails(-135).size <= 16


class Draws:
    """A stand-in for the generator's rng: the given uniforms, counted."""

    def __init__(self, values):
        self.values, self.used = list(values), 0

    def random(self) -> float:
        self.used += 1
        return self.values[self.used - 1]


def test_a_blocked_seed_fails_at_once_and_counts_as_one_try():
    """The original's seed returns failure without a paddle retry (``seed_snake``,
    ``initialize_two_seeds``); a distractor gets max_distractor_contour_retrial + 1 such tries, and a
    target pair whose first seed fails is redrawn (one more target attempt). u = 0.5 draws 0 degrees
    (blocked on PF-32), u = 0.125 draws -135 degrees."""
    geo = pg._geometry(pg.PF32, 1)
    canvas = pg._Canvas(geo, Draws([0.5] * 5))
    with pytest.raises(pg._Failed):
        canvas.seed_snake(2.0, max_trials=2)
    assert canvas.rng.used == 1
    canvas.rng = Draws([0.5] * 5)
    assert canvas.distractors(count=1, length=1, max_snake_trials=4) == [] and canvas.rng.used == 5
    assert not canvas.image.any()
    canvas.rng = Draws([0.5])
    with pytest.raises(pg._Failed):
        canvas.two_targets()
    assert canvas.rng.used == 1
    canvas.rng = Draws([0.125, 0.0])  # -135 degrees, then the first free tail
    snake = canvas.seed_snake(2.0, max_trials=2)
    assert canvas.rng.used == 2 and snake.theta == -135 * math.pi / 180


def test_incremental_dilation_equals_full_dilation():
    """The head weights read an occupancy mask dilated incrementally, patch by patch; it must equal
    dilating the whole mask (cv2.dilate in the original), also near the image border."""
    for params in (pg.PF32, pg.PF128):
        geo = pg._geometry(params, params.paddle_margin_list[-1])
        canvas = pg._Canvas(geo, pg.batch_rng(5, 0))
        while True:
            try:
                canvas.two_targets()
                break
            except pg._Failed:
                canvas.reset()
        canvas.distractors(params.num_distractor_snakes, params.distractor_length, 4)
        n, pad = geo.size, geo.pad
        inner = canvas.mask[pad:pad + n, pad:pad + n]
        np.testing.assert_array_equal(canvas.dilated[pad:pad + n, pad:pad + n], pg._dilate(inner, geo.disc))
        assert canvas.mask.sum() == pytest.approx(inner.sum())  # nothing outside the image


def test_windowed_circle_equals_full_canvas_circle():
    size, aa, radius = 32, 2, 1.5
    for centre in [(16, 16), (0, 5), (2, 31), (31, 31), (7, 1)]:
        y, x = np.ogrid[-centre[0] * aa:(size - centre[0]) * aa, -centre[1] * aa:(size - centre[1]) * aa]
        full = ((x * x + y * y) <= (radius * aa) ** 2).astype(np.uint8) * 255
        expected = np.asarray(Image.fromarray(full).resize((size, size), Image.Resampling.LANCZOS))
        np.testing.assert_array_equal(pg.draw_circle(size, centre, radius, aa), expected)


def test_paddle_patch_is_a_line_of_the_right_length():
    geo = pg._geometry(pg.PF128, 2)
    for degrees in (0, 90, -135):
        paddle = geo.paddle(degrees * math.pi / 180)
        ys, xs = np.nonzero(paddle.line > 0.5)
        ends = np.array([ys - geo.half, xs - geo.half], float)
        direction = np.array([math.sin(math.radians(degrees)), math.cos(math.radians(degrees))])
        along = direction @ ends
        assert along.min() >= -1.5 and along.max() <= pg.PF128.paddle_length + 1.5
        assert along.max() - along.min() >= pg.PF128.paddle_length - 1.5
        assert paddle.mask.max() == 1.0 and (paddle.mask >= paddle.line.clip(0, 1) - 1e-9).all()


def test_path_x_size(tmp_path):
    rng = pg.batch_rng(0, 0)
    sample = pg.sample_image(rng, pg.PF128)
    assert sample.image.shape == (128, 128) and sample.image.max() == 255
    assert sample.margin in (2, 3)
    assert 0.05 <= (sample.image > 0).mean() <= 0.3
    folder = pg.generate(tmp_path / "pathfinder128", 1, seed=0, params=pg.PF128)
    row = read_metadata(folder)[0]
    assert row[4:8] == ["1.8", "14", "4", "5"] and row[9] in ("2", "3")
    assert Image.open(folder / row[0] / row[1]).size == (128, 128)
