"""Pathfinder generator benchmark: seconds per image on one core and image statistics, against the
original generator (``ORIGINAL_PF32``: drewlinsley/pathfinder run with LRA's PF-32 settings).

    python -m benchmarks.pathfinder [--num-images 400] [--num-images-128 20] [--examples /tmp/pf]
    python -m benchmarks.pathfinder --probe DATA/pathfinder32/curv_contour_length_14 [--probe-epochs 5]

Timing is end to end through ``write_batch`` (sampling, PNG encoding, metadata) in this one process,
as CPU seconds (``time.process_time``: what one core spends, robust to other load on the machine)
and wall seconds.

``--probe FOLDER`` answers a different question: do the labels of a Pathfinder folder (generated, or the
release's) carry signal at all? It trains a small CNN (the architecture family that learns Pathfinder
fastest) on the folder's own 80/10/10 split, read through the task's reader, and prints test accuracy per
epoch. A generator bug that decouples the circles from the label would keep it at 50 % on every
difficulty; on the easy difficulty without distractors it should climb well above chance in minutes.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import tasks.pathfinder_generator as pg
import tasks.pathfinder as pf

# The original drewlinsley/pathfinder (commit ab9c130, the code LRA's release was made with) run on this
# machine with LRA's PF-32 settings (spec §5, use_single_paddles=False), OpenCV 5.0, and stand-ins for
# the scipy.misc of scipy 1.0-1.2 (imresize: bytescale to uint8, then Pillow Lanczos; imsave: bytescale),
# seeded through np.random.seed/random.seed; keyed by contour length: 2,000 images each (hard: seed 3,
# easy: seed 2; 400 hard ones with seed 0 gave 34.5 %, 20.4, 1.25, 297, 241). cpu_s: CPU seconds per
# image on one core (uninstrumented; 0.21-0.27 in the same window as this benchmark's 0.010). Only 30 of
# 360 first-paddle orientations (-150..-121 degrees) ever seeded (pathfinder_generator._Geometry.seed_blocked).
ORIGINAL_PF32 = {
    14: {"nonzero": 0.342, "mean": 20.2, "distractors": 1.15, "target_attempts": 308.0, "marker_peak": 241,
         "cpu_s": 0.22, "n": 2000},
    6: {"nonzero": 0.228, "mean": 13.0, "distractors": 3.30, "target_attempts": 22.1, "marker_peak": 239,
        "cpu_s": 0.025, "n": 2000},
}
SPEEDUP_TARGET = 5.0


def measure(params: pg.PathfinderParams, num_images: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        pg.sample_image(pg.batch_rng(seed, 10**6), params)  # build the caches outside the timing
        cpu, wall = time.process_time(), time.perf_counter()
        pg.write_batch(Path(tmp), 0, num_images, seed, params)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        images = np.stack([np.asarray(Image.open(Path(tmp) / "imgs" / "0" / f"sample_{i}.png"))
                           for i in range(num_images)])
        labels = np.array([int(line.split(" ")[3]) for line in
                           (Path(tmp) / "metadata" / "0.npy").read_text().split("\n")[:-1]])
    # The same images again, in memory, for what the files do not show.
    rng = pg.batch_rng(seed, 0)
    samples = [pg.sample_image(rng, params) for _ in range(num_images)]
    assert all((s.image == im).all() for s, im in zip(samples, images))
    return {
        "cpu_s_per_image": cpu / num_images, "wall_s_per_image": wall / num_images,
        "nonzero": float((images > 0).mean()), "nonzero_sd": float((images > 0).mean((1, 2)).std()),
        "nonzero_above_5": float((images > 5).mean()), "mean": float(images.mean()),
        "label_1": float(labels.mean()), "n": num_images,
        "target_attempts": float(np.mean([s.target_attempts for s in samples])),
        "distractors": float(np.mean([len(s.distractors) for s in samples])),
        "marker_peak": marker_peak(samples), "samples": samples,
    }


def marker_peak(samples) -> float:
    """The median pixel at the circles' centres: the circles (1.0) against the brightest paddle after
    min-max scaling, so it shows how bright the distractors drawn are."""
    return float(np.median([s.image[m] for s in samples for m in (s.origin_marker, s.terminal_marker)]))


def save_examples(samples, folder: Path, name: str, count: int = 8) -> Path:
    """An upscaled grid of the first ``count`` images (labels in the file name order, left to right)."""
    zoom = max(1, 256 // samples[0].image.shape[0])
    folder.mkdir(parents=True, exist_ok=True)
    tiles = [np.pad(np.kron(s.image, np.ones((zoom, zoom), np.uint8)), 2, constant_values=96)
             for s in samples[:count]]
    rows = [np.concatenate(tiles[i:i + 4], 1) for i in range(0, len(tiles) - len(tiles) % 4, 4)]
    labels = "".join(str(s.label) for s in samples[:len(rows) * 4])
    path = folder / f"{name}_labels_{labels}.png"
    Image.fromarray(np.concatenate(rows, 0)).save(path)
    return path


def probe_net(width: int = 32) -> nn.Sequential:
    """Eight 3x3 conv layers (BatchNorm, ReLU) with two 2x poolings, then a global max: a receptive field
    of the whole 32x32 image, about 200k parameters."""
    def conv(inputs: int, outputs: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU()]

    w, w2 = width, 2 * width
    return nn.Sequential(*conv(1, w), *conv(w, w), *conv(w, w), nn.MaxPool2d(2), *conv(w, w2), *conv(w2, w2),
                         *conv(w2, w2), nn.MaxPool2d(2), *conv(w2, w2), *conv(w2, w2), nn.AdaptiveMaxPool2d(1),
                         nn.Flatten(), nn.Linear(w2, 2))


def probe_split(examples, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One split from the task reader as ``(N, 1, S, S)`` floats in [0, 1] and ``(N,)`` labels."""
    pixels, labels = zip(*((e["input_ids"], e["label"]) for e in examples))
    images = torch.from_numpy(np.stack(pixels)).float().div_(255).view(-1, 1, image_size, image_size)
    return images, torch.tensor(labels)


def probe(folder: Path, epochs: int, seed: int, batch_size: int = 64, lr: float = 1e-3) -> list[float]:
    """Test accuracy after each epoch of :func:`probe_net` trained with Adam on the train split of the
    difficulty ``folder`` (e.g. ``DATA/pathfinder32/curv_contour_length_14``), split as the task does."""
    entries, _ = pf.drop_empty(pf.read_metadata(folder, pf.metadata_files(folder)))
    if not entries:
        raise SystemExit(f"{folder}: no images listed in metadata/*.npy")
    size = Image.open(entries[0].path).size[0]
    splits = {name: probe_split(pf.examples(entries, indices, size), size)
              for name, indices in pf.split_indices(len(entries), seed=0).items() if name != "val"}
    (x, y), (x_test, y_test) = splits["train"], splits["test"]
    torch.manual_seed(seed)
    net = probe_net()
    optimizer = torch.optim.Adam(net.parameters(), lr)
    accuracies, start = [], time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            batch = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            accuracies.append((net(x_test).argmax(1) == y_test).float().mean().item())
        print(f"epoch {epoch + 1}: train loss {loss.item():.3f}, test accuracy {100 * accuracies[-1]:.1f}% "
              f"(n={len(y_test)}), {time.perf_counter() - start:.0f} s", flush=True)
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=400, help="PF-32 images")
    parser.add_argument("--num-images-128", type=int, default=20, help="Path-X images (0 to skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=Path, default=None, help="save upscaled example grids here")
    parser.add_argument("--probe", type=Path, default=None,
                        help="instead: train the CNN probe on this difficulty folder (see the module docstring)")
    parser.add_argument("--probe-epochs", type=int, default=5)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe, args.probe_epochs, args.seed)
        return

    runs = [("PF-32", pg.PF32, args.num_images), ("PF-32 cl=9", pg.pf32(9), args.num_images),
            ("PF-32 cl=6", pg.pf32(6), args.num_images),
            # What this generator drew before it copied the original's cv2.dilate border (see ORIGINAL_PF32).
            ("PF-32 free border", replace(pg.PF32, opencv_seed_border=False), args.num_images)]
    if args.num_images_128:
        runs.append(("PF-128 (Path-X)", pg.PF128, args.num_images_128))
    header = (f"{'':19}{'cpu s/img':>10}{'wall s/img':>11}{'nonzero':>9}{'(sd)':>7}{'>5':>7}{'mean':>7}"
              f"{'label=1':>9}{'pairs tried':>13}{'distractors':>13}{'marker':>8}")
    print(header)
    results = {}
    for name, params, n in runs:
        r = results[name] = measure(params, n, args.seed)
        print(f"{name:19}{r['cpu_s_per_image']:10.4f}{r['wall_s_per_image']:11.4f}{r['nonzero']:9.3f}"
              f"{r['nonzero_sd']:7.3f}{r['nonzero_above_5']:7.3f}{r['mean']:7.1f}{r['label_1']:9.3f}"
              f"{r['target_attempts']:13.1f}{r['distractors']:13.2f}{r['marker_peak']:8.0f}  (n={n})")
        if args.examples:
            print(f"  examples: {save_examples(r['samples'], args.examples, name.replace(' ', '_').lower())}")
    for contour_length, o in ORIGINAL_PF32.items():
        name = f"original cl={contour_length}"
        print(f"{name:19}{o['cpu_s']:10.4f}{'':11}{o['nonzero']:9.3f}{'':14}{o['mean']:7.1f}{'':9}"
              f"{o['target_attempts']:13.1f}{o['distractors']:13.2f}{o['marker_peak']:8.0f}  (n={o['n']})")
    speedup = ORIGINAL_PF32[14]["cpu_s"] / results["PF-32"]["cpu_s_per_image"]
    verdict = "meets" if speedup >= SPEEDUP_TARGET else "MISSES"
    print(f"PF-32 speed-up per image on one core: {speedup:.1f}x ({verdict} the {SPEEDUP_TARGET:.0f}x target)")


if __name__ == "__main__":
    main()
