"""Polygons and RoIs as training meets them, for the mask-target tests (tests/test_mask_targets.py and
the interpreter checks of tests/support/rasterise_checks.py): an image of H x W."""
from __future__ import annotations

import numpy as np

H, W = 480, 640


def random_instances(count: int, seed: int = 0, most_points: int = 40) -> list[tuple[list[list[float]], list[float]]]:
    """(polygons, RoI) pairs as training meets them: 1-3 polygons of 3-`most_points` points (some on integer
    coordinates, some self-crossing), RoIs from sub-pixel to larger than the object, partly outside
    the image, so the cropped coordinates go negative and far beyond the 28x28 frame."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        cx, cy, radius = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(2, 200)
        polygons = []
        for _ in range(rng.integers(1, 4)):
            k = rng.integers(3, most_points + 1)
            angles = rng.uniform(0, 2 * np.pi, k)
            if rng.random() < 0.7:
                angles = np.sort(angles)  # a simple polygon; otherwise self-crossing
            radii = radius * rng.uniform(0.3, 1.0, k)
            points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
            if rng.random() < 0.3:
                points = np.round(points)
            points[:, 0], points[:, 1] = points[:, 0].clip(0, W), points[:, 1].clip(0, H)
            polygons.append(points.reshape(-1).tolist())
        bw, bh = rng.uniform(0.3, 2 * radius), rng.uniform(0.3, 2 * radius)
        bx, by = cx + rng.uniform(-radius, radius) - bw / 2, cy + rng.uniform(-radius, radius) - bh / 2
        cases.append((polygons, [bx, by, bx + bw, by + bh]))
    return cases
