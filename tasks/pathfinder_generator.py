"""Pathfinder / Path-X image generator (Linsley et al. 2018; Kim*, Linsley* et al. 2020), numpy + Pillow.

A re-implementation of ``drewlinsley/pathfinder`` (``snakes2.from_wrapper`` with ``snakes.py``), the
script the LRA release was made with (LRA ``lra_benchmarks/data/pathfinder.py``; spec §5). Per image:

1. ``label ~ U{0,1}`` (i.i.d., as the original; not balanced per batch) and a paddle margin ``m``.
2. Two target snakes whose first paddles start ``seed_distance`` apart near the centre, each extended
   paddle by paddle: candidate heads on a circle of radius ``L+m`` around a pivot ``L+2m`` ahead,
   weighted by ``cos(min(turn*continuity, pi/2))**2`` times the free space of the dilated occupancy
   mask; a paddle whose mask overlaps the occupancy (``max(mask + paddle) >= 1.8``) is redrawn, and a
   pair that cannot be finished is thrown away and redrawn.
3. Short distractor snakes (and, with ``use_single_paddles``, one-paddle distractors) in free space;
   a distractor that fails is retried ``max_distractor_contour_retrial`` times, then left out.
4. Two circles: one on the origin tip of a random target snake, one on the terminal tip of the same
   snake (label 1) or of the other one (label 0).
5. Paddles and circles are drawn at ``antialias_scale``x with Pillow, Lanczos-downsampled, scaled by a
   contrast and combined by ``max``; the float image is min-max scaled to uint8 (``scipy.misc.imsave``).

Seeds (the first paddle of target snake 0 and of each distractor) fail as the original's do: it dilates
the mask with an off-centre struct through ``cv2.dilate``, whose -DBL_MAX border makes every seed fail
at most orientations (``_Geometry.seed_blocked``). On PF-32 only 30 of 360 orientations can seed, so a
target pair is drawn ~300 times per image and only ~1.2 of the 5 distractors are drawn (3.3 of 10 at
contour length 6): 34 % non-zero pixels, not the 45 % an image with a free border would have. Path-X
is hardly affected (6 of 360 orientations blocked at margin 2).

What makes it fast (PF-32 hard: ~0.009 CPU-s per image against the original's 0.18 on the same core,
benchmarks/pathfinder.py):
every paddle patch, its occupancy patch, its dilation and every seed-dilation kernel depend only on an
orientation from a finite set, so each is rendered once and cached; paddles are pasted as small
patches; the occupancy dilated by the margin disc is kept up to date patch by patch and read only at
the ~20-50 candidate heads; the first target seed's free pixels (on an empty canvas) are cached; the
other seed dilations are boolean ORs of shifted views; a blocked orientation is known per geometry and
fails before any dilation. Most of the remaining time is the original's own rejection loop: a PF-32
target pair is drawn ~300 times on average (Path-X: ~375) before one fits.

Output layout (what the LRA loaders read, spec §2.5)::

    <root>/<difficulty>/imgs/<batch_id>/sample_<i>.png   8-bit grayscale, image_size x image_size
    <root>/<difficulty>/metadata/<batch_id>.npy          TEXT, one line per image, 11 fields:
        imgs/<batch_id> sample_<i>.png <i> <label> <continuity> <contour_length> <distractor_length>
        <paddle_length> <paddle_thickness> <paddle_margin> <n_paddle_contrasts>

``<difficulty>`` is ``curv_contour_length_<L>`` (``curv_baseline`` for L=6, snakes2_wrapper.py).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

LANCZOS = Image.Resampling.LANCZOS
OCCUPIED = 0.3  # find_available_coordinates: a pixel is taken once ceil(mask - 0.3) >= 1
OVERLAP = 1.8  # extend_snake accepts a paddle only if max(mask + paddle_mask) < 1.8
STOP_AVAILABILITY = 0.01  # distractors stop once < 1% of the (undilated) mask is free
MAX_TARGET_ATTEMPTS = 100_000  # the original retries the target pair forever; we fail loudly instead
NO_TAILS = np.zeros(0, np.int64)
# Bumped whenever the same parameters and seed give other images; generated folders record it
# (tasks/pathfinder.py refuses older ones). 2: seeds fail at cv2.dilate's border as the original's.
GENERATOR_VERSION = 2


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class PathfinderParams:
    """Generator settings. Field names are the original ``snakes2_wrapper.Args`` names; the defaults
    are LRA's Pathfinder-32 "hard" (LRA data/pathfinder.py docstring of ``Pathfinder32``; spec §5).

    Build other presets with :func:`pf32`, :func:`pf64`, :func:`pf128` (Path-X) and :func:`pf256`,
    which also derive the distractor numbers from ``contour_length`` as LRA did."""

    image_size: int = 32  # window_size (square)
    contour_length: int = 14  # paddles per target snake: 6 easy (curv_baseline), 9, 14 hard
    padding: int = 1  # occupied border of the mask
    antialias_scale: int = 2
    paddle_length: int = 2
    paddle_thickness: float = 0.5  # thickness * antialias_scale must be an integer (the original checks)
    paddle_margin_list: tuple[int, ...] = (1,)  # one margin drawn per image
    marker_radius: float = 1.5
    seed_distance: int = 7  # distance of the two target snakes' origin tips
    continuity: float = 1.0  # turn penalty; 1.0 forbids turns >= 90 degrees
    distractor_length: int = 4  # contour_length // 3
    num_distractor_snakes: int = 5  # 20 // distractor_length
    snake_contrast_list: tuple[float, ...] = (2.0,)
    paddle_contrast_list: tuple[float, ...] = (0.75,)
    max_distractor_contour_retrial: int = 4
    max_paddle_retrial: int = 2
    use_single_paddles: bool = False  # snakes2_wrapper.py sets False (spec §5)
    # The original's seeds fail at every orientation whose struct leaves an image pixel with no tap
    # inside (cv2.dilate's -DBL_MAX border; _Geometry.seed_blocked). False treats the outside of the
    # image as free: denser images (PF-32 hard: 45 % non-zero pixels, not 34.5 %) than LRA released.
    opencv_seed_border: bool = True

    def __post_init__(self) -> None:
        aa_thickness = self.paddle_thickness * self.antialias_scale
        if aa_thickness != round(aa_thickness):
            raise ValueError(f"paddle_thickness * antialias_scale = {aa_thickness} must be an integer "
                             "(the original raises 'thickness does not break even')")
        if not self.paddle_margin_list or not self.snake_contrast_list or not self.paddle_contrast_list:
            raise ValueError("paddle_margin_list, snake_contrast_list and paddle_contrast_list need >= 1 value")
        if self.contour_length < 1 or self.image_size < 2 * self.padding + 1:
            raise ValueError(f"bad contour_length {self.contour_length} or image_size {self.image_size}")

    @property
    def difficulty(self) -> str:
        """The release's folder name for this contour length (snakes2_wrapper.py)."""
        return "curv_baseline" if self.contour_length == 6 else f"curv_contour_length_{self.contour_length}"


def _lra_preset(contour_length: int, distractor_paddles: int, **fields) -> PathfinderParams:
    # snakes2_wrapper.py / LRA: distractor_length = cl / 3, num_distractor_snakes = N / distractor_length,
    # integer divisions under the Python 2 the original ran on.
    distractor_length = max(contour_length // 3, 1)
    return PathfinderParams(contour_length=contour_length, distractor_length=distractor_length,
                            num_distractor_snakes=distractor_paddles // distractor_length, **fields)


def pf32(contour_length: int = 14) -> PathfinderParams:
    """LRA "Pathfinder" (pathfinder32; LRA data/pathfinder.py ``Pathfinder32``)."""
    return _lra_preset(contour_length, 20)


def pf64(contour_length: int = 14) -> PathfinderParams:
    """pathfinder64 (LRA data/pathfinder.py ``Pathfinder64``; wrapper defaults elsewhere)."""
    return _lra_preset(contour_length, 22, image_size=64, padding=1, antialias_scale=2, paddle_length=5,
                       paddle_thickness=1.0, paddle_margin_list=(1,), marker_radius=2.5, seed_distance=12,
                       continuity=1.8, snake_contrast_list=(0.8,), paddle_contrast_list=(1.0,))


def pf128(contour_length: int = 14) -> PathfinderParams:
    """LRA "Path-X" (pathfinder128; LRA data/pathfinder.py ``Pathfinder128``; wrapper defaults elsewhere:
    paddle_length 5, paddle_contrast_list [1.0]; antialias_scale is set to 4 and then overwritten by 2)."""
    return _lra_preset(contour_length, 35, image_size=128, padding=1, antialias_scale=2, paddle_length=5,
                       paddle_thickness=1.5, paddle_margin_list=(2, 3), marker_radius=3.0, seed_distance=20,
                       continuity=1.8, snake_contrast_list=(0.9,), paddle_contrast_list=(1.0,))


def pf256(contour_length: int = 14) -> PathfinderParams:
    """pathfinder256 (LRA data/pathfinder.py ``Pathfinder256``; wrapper defaults: padding 22,
    seed_distance 27, paddle_length 5, paddle_contrast_list [1.0])."""
    return _lra_preset(contour_length, 30, image_size=256, padding=22, antialias_scale=2, paddle_length=5,
                       paddle_thickness=2.0, paddle_margin_list=(3,), marker_radius=5.0, seed_distance=27,
                       continuity=1.8, snake_contrast_list=(1.0,), paddle_contrast_list=(1.0,))


PRESETS = {"pathfinder32": pf32, "pathfinder64": pf64, "pathfinder128": pf128, "pathfinder256": pf256}
PF32 = pf32()
PF128 = pf128()


def metadata_line(batch_id: int, index: int, label: int, margin: int, params: PathfinderParams) -> str:
    """One metadata row (``snakes2.accumulate_meta``), space separated, without the newline."""
    return " ".join(str(f) for f in (
        f"imgs/{batch_id}", f"sample_{index}.png", index, label, params.continuity, params.contour_length,
        params.distractor_length, params.paddle_length, params.paddle_thickness, margin,
        len(params.paddle_contrast_list)))


# ---------------------------------------------------------------------------------------------
# Rendering primitives (each cached: they depend on an orientation from a finite set)


def _translate(y: float, x: float, theta: float, dist: float) -> tuple[int, int]:
    """``snakes.translate_coord``: move by ``dist`` along ``theta`` and round *up* (ceil)."""
    return math.ceil(y + dist * math.sin(theta)), math.ceil(x + dist * math.cos(theta))


def _flip(theta: float) -> float:
    """``snakes.flip_by_pi``."""
    return theta + math.pi if theta < 0 else theta - math.pi


def _disc(radius: int) -> np.ndarray:
    """``snakes.generate_dilation_struct``: the boolean disc x^2 + y^2 <= r^2."""
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def _dilate(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Grey dilation (max filter) with a centred kernel that contains its anchor; outside the image is
    ignored, which is what cv2.dilate's -DBL_MAX border amounts to for such a kernel."""
    ry, rx = kernel.shape[0] // 2, kernel.shape[1] // 2
    h, w = image.shape
    padded = np.zeros((h + 2 * ry, w + 2 * rx), image.dtype)  # images here are >= 0
    padded[ry:ry + h, rx:rx + w] = image
    out = np.zeros_like(image)
    for dy, dx in zip(*np.nonzero(kernel)):
        np.maximum(out, padded[dy:dy + h, dx:dx + w], out=out)
    return out


def dilation_border_blocks(size: int, dy: np.ndarray, dx: np.ndarray) -> bool:
    """Whether ``cv2.dilate`` of a float ``size`` x ``size`` image by a kernel with taps at offsets
    ``(dy, dx)`` from its anchor (``dst[p] = max src[p + offset]``; no mirroring) leaves -DBL_MAX in
    some pixel. Its default border value (``morphologyDefaultBorderValue``) becomes -DBL_MAX for
    float images, so a pixel none of whose taps lands inside the image keeps it; one inside tap is
    enough to beat it. Pixel (r, c) is reached iff some tap has 0 <= r+dy < size and 0 <= c+dx < size."""
    rows = np.arange(size)[:, None]
    row_in = ((rows + dy >= 0) & (rows + dy < size)).astype(np.int64)  # (size, taps)
    col_in = ((rows + dx >= 0) & (rows + dx < size)).astype(np.int64)
    return bool(((row_in @ col_in.T) == 0).any())


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    """``scipy.misc.imresize(..., interp='lanczos')`` of a 0/255 uint8 array: Pillow Lanczos in mode L
    (so ringing is clipped to 0..255 and rounded), returned as float in 0..1."""
    return np.asarray(Image.fromarray(array).resize((size, size), LANCZOS), np.float64) / 255.0


@dataclass(frozen=True)
class _Paddle:
    """One rendered paddle: (2h+1)^2 patches whose centre pixel is where the line starts."""

    line: np.ndarray  # intensity in 0..1 (before contrast)
    mask: np.ndarray  # occupancy: the line dilated by the margin, anti-aliased, 0..1
    dilated: np.ndarray  # ``mask`` grey-dilated by the disc of radius m, (2(h+m)+1)^2


class _Geometry:
    """Everything that depends only on (params, margin): paddle patches, kernels, candidate heads,
    and the empty canvas."""

    def __init__(self, params: PathfinderParams, margin: int):
        p = self.params = params
        n = self.size = p.image_size
        L, aa = p.paddle_length, p.antialias_scale
        self.margin, self.radius = margin, L + margin
        self.half = L + math.ceil(p.paddle_thickness) + margin  # draw_line_n_mask's patch radius
        self.aa_width = int(round(p.paddle_thickness * aa))
        self.aa_disc = _disc(margin * aa)
        self.disc = _disc(margin)  # ``small_dilation_structs``: dilates the mask for head sampling
        self.disc_offsets = [(dy - margin, dx - margin) for dy, dx in zip(*np.nonzero(self.disc))]
        self._paddles: dict[float, _Paddle] = {}
        self._seed_kernels: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._first_tails: dict[int, np.ndarray] = {}
        self._seed_blocked: dict[int, bool] = {}
        self._weights: dict[float, np.ndarray] = {}
        # Candidate heads (get_coords_cmf): points on a circle of radius L+m one pixel of arc apart,
        # truncated to ints, de-duplicated and sorted. The original floors *absolute* coordinates; for
        # an integer pivot that is pivot + floor(offset). Offsets within 1e-9 of an integer (sin of
        # multiples of pi) are snapped to it, as the absolute float would round to the integer.
        radius = self.radius
        angles = np.arange(0, 360, 360.0 / (2 * radius * np.pi)) * np.pi / 180
        offsets = np.stack([radius * np.sin(angles), radius * np.cos(angles)], 1)
        snapped = np.round(offsets)
        offsets = np.where(np.abs(offsets - snapped) < 1e-9, snapped, offsets)
        offsets = np.unique(np.floor(offsets).astype(np.int64), axis=0)
        self.cand_dy, self.cand_dx = offsets[:, 0], offsets[:, 1]
        self.cand_reach = (int(-offsets.min()), int(offsets.max()))
        self.cand_theta = np.arctan2(self.cand_dy, self.cand_dx)
        self.cand_theta_list = self.cand_theta.tolist()
        self.cand_flip = [_flip(t) for t in self.cand_theta_list]
        # Canvas padding, so that no paste or gather leaves the padded arrays: pivots stay within
        # m + 3 px of the image, candidates within L + m of a pivot, patches reach h (+ m dilated).
        self.pad = max(self.half + 2 * margin, radius + margin + 4) + 2
        pad = self.pad
        mask = np.zeros((n + 2 * pad,) * 2)
        inner = mask[pad:pad + n, pad:pad + n]
        inner[:p.padding, :] = inner[-p.padding:, :] = inner[:, :p.padding] = inner[:, -p.padding:] = 1
        self.empty_mask = mask
        self.empty_dilated = np.zeros_like(mask)
        self.empty_dilated[pad:pad + n, pad:pad + n] = _dilate(inner, self.disc)
        self.border_saturates = p.padding >= 1
        self.cand_paddles: list[Optional[_Paddle]] = [None] * len(self.cand_dy)

    def paddle(self, theta: float) -> _Paddle:
        """``snakes.draw_line_n_mask`` at orientation ``theta`` as a local patch (cached)."""
        cached = self._paddles.get(theta)
        if cached is not None:
            return cached
        p, aa, half, m = self.params, self.params.antialias_scale, self.half, self.margin
        centre = half * aa
        # Blown-up canvas (2h*aa + 1)^2 resized to (2h + 1)^2: not exactly a factor aa, as the original;
        # the centre pixel maps exactly onto the centre pixel.
        blown = Image.new("L", (2 * half * aa + 1,) * 2, 0)
        head_y, head_x = _translate(centre, centre, theta, p.paddle_length * aa)
        ImageDraw.Draw(blown).line([(centre, centre), (head_x, head_y)], fill=255, width=self.aa_width)
        blown_array = np.asarray(blown)
        line = _resize(blown_array, 2 * half + 1)
        mask = _resize(_dilate(blown_array, self.aa_disc), 2 * half + 1)
        dilated = _dilate(np.pad(mask, m), self.disc)
        paddle = _Paddle(line=line, mask=mask, dilated=dilated)
        self._paddles[theta] = paddle
        return paddle

    def seed_kernel(self, degrees: int) -> tuple[np.ndarray, np.ndarray]:
        """Offsets (dy, dx) of the oriented struct that dilates the mask before a seed is sampled
        (seed_snake / initialize_two_seeds): the paddle mask drawn into a (2(L+m)+1)^2 struct at
        ``[L+m+1, L+m+1]`` (one pixel off its centre, as the original), keeping the pixels that are
        exactly 1 (``struct.astype(np.uint8)``), anchored at the struct's centre (cv2.dilate does
        not mirror the kernel: a tail is blocked when the paddle that would start there is)."""
        cached = self._seed_kernels.get(degrees)
        if cached is not None:
            return cached
        rows, cols = np.nonzero(self.paddle(degrees * math.pi / 180).mask >= 1.0)
        # Patch index i sits at struct index i - half + reach + 1 (clipped to the struct), and the
        # anchor is struct index reach, so the offset is i - half + 1.
        dy, dx = rows - self.half + 1, cols - self.half + 1
        inside = (np.abs(dy) <= self.radius) & (np.abs(dx) <= self.radius)
        kernel = (dy[inside], dx[inside])
        self._seed_kernels[degrees] = kernel
        return kernel

    def seed_blocked(self, degrees: int) -> bool:
        """Whether the original can never seed a paddle at ``degrees`` on this image size (cached).

        ``seed_snake`` and ``initialize_two_seeds`` dilate the mask with the seed kernel through
        ``cv2.dilate``, whose border gives -DBL_MAX (:func:`dilation_border_blocks`), and the kernel need
        not contain its anchor: the struct is drawn one pixel off its centre, so at most orientations it
        lies on one side of it. Then ``np.ceil(dilated - 0.3)`` is negative somewhere,
        ``find_available_coordinates`` returns no coordinates whatever the mask holds, and the seed
        fails at once, without a retry. On PF-32 only the 30 orientations -150..-121 degrees survive
        (every first paddle points up-left); this is what keeps the released images sparse (1.25 of 5
        distractors drawn, ~300 target pairs tried per image). Path-X loses 6 of 360 at margin 2, none
        at margin 3 (its thicker struct covers its anchor)."""
        blocked = self._seed_blocked.get(degrees)
        if blocked is None:
            blocked = self._seed_blocked[degrees] = (
                self.params.opencv_seed_border and dilation_border_blocks(self.size, *self.seed_kernel(degrees)))
        return blocked

    def free_tails(self, mask: np.ndarray, degrees: int, band: int) -> np.ndarray:
        """Flat indices of the pixels where a paddle at ``degrees`` may start: free (<= 0.3) after
        marking a ``band``-wide border and dilating ``mask`` by the seed kernel; none at all where
        :meth:`seed_blocked`. Elsewhere the -DBL_MAX border never wins a max against an inside tap,
        so taps outside the image are simply ignored (the padding of ``mask`` is free)."""
        if self.seed_blocked(degrees):
            return NO_TAILS
        n, pad = self.size, self.pad
        occupied = mask > OCCUPIED
        occupied[pad:pad + band, pad:pad + n] = True
        occupied[pad + n - band:pad + n, pad:pad + n] = True
        occupied[pad:pad + n, pad:pad + band] = True
        occupied[pad:pad + n, pad + n - band:pad + n] = True
        dilated = np.zeros((n, n), bool)
        for dy, dx in zip(*self.seed_kernel(degrees)):
            np.logical_or(dilated, occupied[pad + dy:pad + dy + n, pad + dx:pad + dx + n], out=dilated)
        return np.flatnonzero(~dilated)

    def first_tails(self, degrees: int) -> np.ndarray:
        """``free_tails`` for the first target seed: the canvas is empty then, so it is cached."""
        cached = self._first_tails.get(degrees)
        if cached is None:
            cached = self._first_tails[degrees] = self.free_tails(
                self.empty_mask, degrees, 2 * self.params.seed_distance)
        return cached

    def continuity_weights(self, last_theta: float) -> np.ndarray:
        """get_coords_cmf's turn weights max(cos(min(|turn| * continuity, pi/2)), 0)^2 (cached)."""
        cached = self._weights.get(last_theta)
        if cached is not None:
            return cached
        turn = np.abs(self.cand_theta - last_theta)
        turn = np.minimum(turn, 2 * np.pi - turn)
        turn = np.minimum(turn * self.params.continuity, 0.5 * np.pi)
        weights = np.maximum(np.cos(turn), 0.0) ** 2
        self._weights[last_theta] = weights
        return weights


@lru_cache(maxsize=32)
def _geometry(params: PathfinderParams, margin: int) -> _Geometry:
    return _Geometry(params, margin)


def draw_circle(size: int, centre: tuple[int, int], radius: float, aa: int) -> np.ndarray:
    """``snakes2.draw_circle`` as uint8 (size x size): a disc of ``radius*aa`` around the aa-pixel
    ``centre*aa``, Lanczos-downsampled by ``aa``. Rendered in a window of the image aligned to the
    aa grid and clipped to the image: every output pixel whose Lanczos support (3 px) reaches the disc
    then sees the same input as on the full canvas, so the result equals the full-canvas rendering."""
    cy, cx = centre
    reach = int(math.ceil(radius)) + 5
    y0, y1 = max(cy - reach, 0), min(cy + reach + 1, size)
    x0, x1 = max(cx - reach, 0), min(cx + reach + 1, size)
    out = np.zeros((size, size), np.uint8)
    if y0 >= y1 or x0 >= x1:
        return out
    y, x = np.ogrid[(y0 - cy) * aa:(y1 - cy) * aa, (x0 - cx) * aa:(x1 - cx) * aa]
    disc = ((x * x + y * y) <= (radius * aa) ** 2).astype(np.uint8) * 255
    out[y0:y1, x0:x1] = np.asarray(Image.fromarray(disc).resize((x1 - x0, y1 - y0), LANCZOS))
    return out


def bytescale(image: np.ndarray) -> np.ndarray:
    """``scipy.misc.imsave``'s min-max scaling of a float image to uint8 (``bytescale``)."""
    low, high = float(image.min()), float(image.max())
    scale = 255.0 / ((high - low) or 1.0)
    return (np.clip((image - low) * scale, 0, 255) + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# One image


@dataclass(frozen=True)
class Snake:
    """A drawn snake: its paddles as (near_end, far_end) points (row, col) in the direction of growth.

    The origin tip is ``paddles[0][0]`` (the seed's tail) and the terminal tip is the last head,
    ``paddles[-1][1]``. Consecutive paddles are about ``2 * margin`` apart (the dashes' gaps)."""

    paddles: tuple[tuple[tuple[float, float], tuple[float, float]], ...]
    origin_tip: tuple[int, int]
    terminal_tip: tuple[int, int]


@dataclass(frozen=True)
class PathfinderSample:
    """One generated image and the geometry behind it (for tests and inspection)."""

    image: np.ndarray  # uint8, (image_size, image_size)
    label: int  # 1: both circles on the same target snake
    margin: int
    targets: tuple[Snake, Snake]
    origin_snake: int  # the target snake that carries the origin circle
    terminal_snake: int  # == origin_snake iff label == 1
    origin_marker: tuple[int, int]  # (row, col) of the circle centres
    terminal_marker: tuple[int, int]
    distractors: tuple[Snake, ...] = field(default=())
    target_attempts: int = 1  # target pairs drawn until one could be finished


class _Failed(Exception):
    """A snake could not be seeded or extended (the original's ``success = False``)."""


class _SnakeState:
    __slots__ = ("pivot", "theta", "pending", "paddles", "origin", "head")

    def __init__(self, pivot, theta, pending, paddles, origin, head):
        self.pivot, self.theta, self.pending = pivot, theta, pending
        self.paddles, self.origin, self.head = paddles, origin, head


class _Canvas:
    """Image, occupancy mask and the mask dilated by the margin disc, padded by ``geo.pad``.

    The mask's padding stays 0 (outside the image is free: ignored by the dilations, see
    ``_Geometry.free_tails``), so mask pastes are clipped to the image; image pastes may spill into
    the padding, which is cut off at the end.
    ``dilated`` is kept equal to ``dilate(mask, disc(m))`` inside the image, paddle by paddle."""

    def __init__(self, geo: _Geometry, rng: np.random.Generator):
        self.geo, self.rng = geo, rng
        self.size, self.pad = geo.size, geo.pad
        self.image = np.zeros_like(geo.empty_mask)
        self.mask = geo.empty_mask.copy()
        self.dilated = geo.empty_dilated.copy()

    def reset(self) -> None:
        self.image.fill(0.0)
        np.copyto(self.mask, self.geo.empty_mask)
        np.copyto(self.dilated, self.geo.empty_dilated)

    def inner_image(self) -> np.ndarray:
        n, pad = self.size, self.pad
        return self.image[pad:pad + n, pad:pad + n]

    # -- painting ------------------------------------------------------------------------------

    def paint(self, paddle: _Paddle, y: int, x: int, contrast: float) -> None:
        half, pad = self.geo.half, self.pad
        view = self.image[y + pad - half:y + pad + half + 1, x + pad - half:x + pad + half + 1]
        np.maximum(view, paddle.line * contrast, out=view)

    def occupy(self, pending) -> None:
        """Add a paddle's mask to the occupancy (the original adds it one paddle late)."""
        paddle, y, x = pending
        geo, n, pad = self.geo, self.size, self.pad
        half, m = geo.half, geo.margin
        Y, X = y + pad, x + pad
        if half <= y < n - half and half <= x < n - half:
            view = self.mask[Y - half:Y + half + 1, X - half:X + half + 1]
            np.maximum(view, paddle.mask, out=view)
        else:
            y0, y1, x0, x1 = max(y - half, 0), min(y + half + 1, n), max(x - half, 0), min(x + half + 1, n)
            view = self.mask[y0 + pad:y1 + pad, x0 + pad:x1 + pad]
            np.maximum(view, paddle.mask[y0 - y + half:y1 - y + half, x0 - x + half:x1 - x + half], out=view)
            if not geo.border_saturates:  # recompute the dilation around the clipped patch
                y0, y1, x0, x1 = max(y0 - m, 0), min(y1 + m, n), max(x0 - m, 0), min(x1 + m, n)
                out = np.zeros((y1 - y0, x1 - x0))
                for dy, dx in geo.disc_offsets:
                    np.maximum(out, self.mask[y0 + pad + dy:y1 + pad + dy, x0 + pad + dx:x1 + pad + dx], out=out)
                self.dilated[y0 + pad:y1 + pad, x0 + pad:x1 + pad] = out
                return
        # The dilated patch may be pasted unclipped: it is exact wherever the disc stays inside the
        # image, and within m of the edge the occupied border already saturates the dilation at 1.
        e = half + m
        view = self.dilated[Y - e:Y + e + 1, X - e:X + e + 1]
        np.maximum(view, paddle.dilated, out=view)

    def overlaps(self, paddle: _Paddle, y: int, x: int) -> bool:
        """``max(mask + paddle_mask) >= 1.8``. Unclipped: outside the image the mask is 0 and a
        paddle mask alone is <= 1, so the padding can never count."""
        half, pad = self.geo.half, self.pad
        view = self.mask[y + pad - half:y + pad + half + 1, x + pad - half:x + pad + half + 1]
        return float((view + paddle.mask).max()) >= OVERLAP

    def choice(self, values: Sequence):
        return values[int(self.rng.random() * len(values))] if len(values) > 1 else values[0]

    def in_bounds(self, *points) -> bool:
        n = self.size
        return all(0 <= y < n and 0 <= x < n for y, x in points)

    # -- seeds ---------------------------------------------------------------------------------

    def seed_paddle(self, tail: tuple[int, int], theta: float, contrast: float) -> _SnakeState:
        geo, L = self.geo, self.geo.params.paddle_length
        paddle = geo.paddle(theta)
        self.paint(paddle, tail[0], tail[1], contrast)
        head = _translate(tail[0], tail[1], theta, L)
        pivot = _translate(head[0], head[1], _flip(theta), L + geo.margin)
        return _SnakeState(pivot, theta, (paddle, tail[0], tail[1]), [(tail, head)], tail, head)

    def sample_seed(self, free: np.ndarray, theta: float) -> Optional[tuple[int, int]]:
        """A uniform tail from ``free`` if its paddle's head and pivot fall inside the image."""
        if free.size == 0:
            raise _Failed
        tail = divmod(int(free[int(self.rng.random() * free.size)]), self.size)
        L, m = self.geo.params.paddle_length, self.geo.margin
        head = _translate(tail[0], tail[1], theta, L)
        return tail if self.in_bounds(head, _translate(head[0], head[1], _flip(theta), L + m)) else None

    def seed_snake(self, contrast: float, max_trials: int) -> _SnakeState:
        """``snakes.seed_snake`` for distractors: a free tail, unless < 1% of the mask is free."""
        n = self.size
        inner = self.mask[self.pad:self.pad + n, self.pad:self.pad + n]
        for _ in range(max_trials + 1):
            degrees = int(self.rng.random() * 360) - 180
            if np.count_nonzero(inner <= OCCUPIED) < STOP_AVAILABILITY * n * n:
                raise _Failed
            theta = degrees * math.pi / 180
            tail = self.sample_seed(self.geo.free_tails(self.mask, degrees, 1), theta)
            if tail is not None:
                return self.seed_paddle(tail, theta, contrast)
        raise _Failed

    # -- extension -----------------------------------------------------------------------------

    def extend(self, snake: _SnakeState, contrast: float, max_trials: int) -> None:
        """``snakes.extend_snake``: one more paddle, or :class:`_Failed`."""
        geo, n, pad = self.geo, self.size, self.pad
        step, theta = geo.radius + geo.margin, snake.theta
        py = math.ceil(snake.pivot[0] + step * math.sin(theta))
        px = math.ceil(snake.pivot[1] + step * math.cos(theta))
        # Weight: turn penalty x (1 - occupancy dilated by the margin disc), 0 outside the image.
        weights = geo.continuity_weights(theta)
        pmf = weights - weights * self.dilated[geo.cand_dy + (py + pad), geo.cand_dx + (px + pad)]
        low, high = geo.cand_reach
        if not (low <= py < n - high and low <= px < n - high):
            cy, cx = geo.cand_dy + py, geo.cand_dx + px
            pmf *= (cy >= 0) & (cy < n) & (cx >= 0) & (cx < n)
        cmf = pmf.cumsum()
        total = float(cmf[-1])
        if total < 1e-4:
            raise _Failed
        random = self.rng.random
        for _ in range(max_trials + 1):
            index = int(cmf.searchsorted(random() * total, side="right"))
            if index == len(cmf):  # u * total rounded up to the total: the last candidate with weight
                index = int(np.flatnonzero(pmf)[-1])
            hy, hx = py + int(geo.cand_dy[index]), px + int(geo.cand_dx[index])
            paddle = geo.cand_paddles[index]
            if paddle is None:  # drawn from the head back towards the pivot
                paddle = geo.cand_paddles[index] = geo.paddle(geo.cand_flip[index])
            if not self.overlaps(paddle, hy, hx):
                break
        else:
            raise _Failed
        self.paint(paddle, hy, hx, contrast)
        self.occupy(snake.pending)
        theta = geo.cand_theta_list[index]
        L = geo.params.paddle_length
        snake.paddles.append(((hy - L * math.sin(theta), hx - L * math.cos(theta)), (hy, hx)))
        snake.pivot, snake.theta, snake.pending, snake.head = (py, px), theta, (paddle, hy, hx), (hy, hx)

    # -- whole snakes --------------------------------------------------------------------------

    def two_targets(self) -> tuple[_SnakeState, _SnakeState]:
        """``snakes2.two_snakes`` + ``initialize_two_seeds``: origin tips ``seed_distance`` apart."""
        geo, rng, p = self.geo, self.rng, self.geo.params
        mu = list(p.snake_contrast_list) * 2  # each snake's contrast: shuffle two copies, take two
        if len(p.snake_contrast_list) > 1:
            mu = [mu[i] for i in rng.permutation(len(mu))[:2]]
        for _ in range(p.max_paddle_retrial + 1):  # first tail: near the centre, free of the struct
            degrees = int(rng.random() * 360) - 180
            theta1 = degrees * math.pi / 180
            tail1 = self.sample_seed(geo.first_tails(degrees), theta1)
            if tail1 is not None:
                break
        else:
            raise _Failed
        L, m = p.paddle_length, geo.margin
        for _ in range(p.max_paddle_retrial + 1):  # second tail: seed_distance away, no mask check
            theta2 = (int(rng.random() * 360) - 180) * math.pi / 180
            direction = int(rng.random() * 360) * math.pi / 180
            tail2 = (int(np.round(tail1[0] + p.seed_distance * math.sin(direction))),
                     int(np.round(tail1[1] + p.seed_distance * math.cos(direction))))
            head = _translate(tail2[0], tail2[1], theta2, L)
            if self.in_bounds(head, _translate(head[0], head[1], _flip(theta2), L + m)):
                break
        else:
            raise _Failed
        snakes = (self.seed_paddle(tail1, theta1, self.choice(p.paddle_contrast_list) * mu[0]),
                  self.seed_paddle(tail2, theta2, self.choice(p.paddle_contrast_list) * mu[1]))
        for _ in range(p.contour_length - 1):
            contrast = self.choice(p.paddle_contrast_list)
            self.extend(snakes[0], contrast * mu[0], p.max_paddle_retrial)
            self.extend(snakes[1], contrast * mu[1], p.max_paddle_retrial)
        # The original commits only the *last* snake's final paddle to the mask, so distractors may
        # touch the end of target snake 0: kept for faithfulness.
        self.occupy(snakes[1].pending)
        return snakes

    def distractors(self, count: int, length: int, max_snake_trials: int) -> list[_SnakeState]:
        """``snakes.make_many_snakes(allow_incomplete=True, stop_with_availability=0.01)``: each snake
        gets ``max_snake_trials + 1`` tries; a failed try leaves image and mask as they were."""
        p = self.geo.params
        drawn = []
        for _ in range(count):
            for _ in range(max_snake_trials + 1):
                saved = self.image.copy(), self.mask.copy(), self.dilated.copy()
                try:
                    snake = self.seed_snake(self.choice(p.snake_contrast_list), p.max_paddle_retrial)
                    for _ in range(length - 1):
                        self.extend(snake, self.choice(p.snake_contrast_list), p.max_paddle_retrial)
                except _Failed:
                    for array, copy in zip((self.image, self.mask, self.dilated), saved):
                        np.copyto(array, copy)
                    continue
                self.occupy(snake.pending)
                drawn.append(snake)
                break
        return drawn


def _snake(state: _SnakeState) -> Snake:
    return Snake(paddles=tuple((tuple(a), tuple(b)) for a, b in state.paddles),
                 origin_tip=tuple(state.origin), terminal_tip=tuple(state.head))


def sample_image(rng: np.random.Generator, params: PathfinderParams = PF32) -> PathfinderSample:
    """Draw one image (``snakes2.from_wrapper``'s loop body) with its geometry."""
    p, n = params, params.image_size
    label = int(rng.random() * 2)
    margin = p.paddle_margin_list[int(rng.random() * len(p.paddle_margin_list))]
    geo = _geometry(p, margin)
    canvas = _Canvas(geo, rng)
    for attempt in range(1, MAX_TARGET_ATTEMPTS + 1):
        try:
            targets = canvas.two_targets()
            break
        except _Failed:
            canvas.reset()
    else:
        raise RuntimeError(f"could not place two target snakes in {MAX_TARGET_ATTEMPTS} attempts with {p}: "
                           "contour_length too long for image_size?")
    drawn = canvas.distractors(p.num_distractor_snakes, p.distractor_length, p.max_distractor_contour_retrial)
    if p.use_single_paddles:
        # snakes2.from_wrapper: top up to a paddle budget of 150 * 123.5 / (7.5 + 13m + 4m^2) with singles.
        budget = int(150 / ((7.5 + 13 * margin + 4 * margin * margin) / 123.5))
        singles = budget - 2 * p.contour_length - p.num_distractor_snakes * p.distractor_length
        drawn += canvas.distractors(singles, 1, p.max_paddle_retrial)
    origin_snake = int(rng.random() * 2)
    terminal_snake = origin_snake if label == 1 else 1 - origin_snake
    origin, terminal = targets[origin_snake].origin, targets[terminal_snake].head
    aa = p.antialias_scale
    markers = np.maximum(draw_circle(n, origin, p.marker_radius, aa), draw_circle(n, terminal, p.marker_radius, aa))
    image = np.maximum(canvas.inner_image(), markers / 255.0)
    return PathfinderSample(
        image=bytescale(image), label=label, margin=margin, targets=(_snake(targets[0]), _snake(targets[1])),
        origin_snake=origin_snake, terminal_snake=terminal_snake, origin_marker=tuple(origin),
        terminal_marker=tuple(terminal), distractors=tuple(_snake(s) for s in drawn), target_attempts=attempt)


# ---------------------------------------------------------------------------------------------
# Files


def batch_rng(seed: int, batch_id: int) -> np.random.Generator:
    """The generator of one batch: independent of the others and of how batches are spread over workers."""
    return np.random.default_rng(np.random.SeedSequence([seed, batch_id]))


def write_batch(folder: Union[str, Path], batch_id: int, num_images: int, seed: int,
                params: PathfinderParams = PF32) -> list[str]:
    """Write ``imgs/<batch_id>/sample_<i>.png`` and then ``metadata/<batch_id>.npy`` (text) under
    ``folder`` (the difficulty folder); returns the metadata lines. The metadata file is written last
    (atomically), so an interrupted batch is invisible to the loaders."""
    folder = Path(folder)
    images = folder / "imgs" / str(batch_id)
    images.mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    rng = batch_rng(seed, batch_id)
    lines = []
    for i in range(num_images):
        sample = sample_image(rng, params)
        Image.fromarray(sample.image).save(images / f"sample_{i}.png", format="PNG")
        lines.append(metadata_line(batch_id, i, sample.label, sample.margin, params))
    target = folder / "metadata" / f"{batch_id}.npy"
    tmp = target.with_suffix(f".npy.tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, target)
    return lines


def _write_batch_star(args):
    return write_batch(*args)


def generate(root: Union[str, Path], num_images: int, seed: int = 0, params: PathfinderParams = PF32,
             images_per_batch: int = 1000, workers: int = 1, overwrite: bool = False) -> Path:
    """Generate ``num_images`` images into ``<root>/<params.difficulty>/`` in batches of
    ``images_per_batch`` (the last one may be smaller), batch ``b`` seeded by ``(seed, b)``: the same
    arguments give the same bytes whatever ``workers`` is. ``workers > 1`` spreads batches over
    processes. Refuses to overwrite existing metadata unless ``overwrite``. Returns the folder."""
    if num_images < 0 or images_per_batch < 1:
        raise ValueError(f"need num_images >= 0 and images_per_batch >= 1, got {num_images}, {images_per_batch}")
    folder = Path(root) / params.difficulty
    sizes = [min(images_per_batch, num_images - start) for start in range(0, num_images, images_per_batch)]
    existing = [folder / "metadata" / f"{b}.npy" for b in range(len(sizes))]
    existing = [path for path in existing if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists ({len(existing)} batch files): pass overwrite=True "
                              f"or remove {folder}")
    jobs = [(folder, b, size, seed, params) for b, size in enumerate(sizes)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            list(pool.map(_write_batch_star, jobs))
    else:
        for job in jobs:
            write_batch(*job)
    return folder


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m tasks.pathfinder_generator ROOT --preset pathfinder32 --num-images N``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="e.g. DATA/pathfinder32; writes ROOT/curv_contour_length_L/")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="pathfinder32")
    parser.add_argument("--contour-length", type=int, default=14, help="6 easy, 9 intermediate, 14 hard")
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--images-per-batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    params = PRESETS[args.preset](args.contour_length)
    folder = generate(args.root, args.num_images, args.seed, params, args.images_per_batch, args.workers,
                      args.overwrite)
    print(f"wrote {args.num_images} images to {folder}")


if __name__ == "__main__":
    main()
