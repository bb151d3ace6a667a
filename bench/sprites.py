"""Time to render the sprites templates and the whole factor grid (737,280 images). Prints one JSON line.

    python bench/sprites.py --image-size 64
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import numpy as np

from nvae_hub import sprites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64, choices=sorted(sprites.IMAGE_SIZES.values()))
    parser.add_argument("--chunk", type=int, default=1 << 16, help="images rendered per call (default: 65536)")
    args = parser.parse_args()

    start = time.perf_counter()
    renderer = sprites.SpritesRenderer(args.image_size)
    template_seconds = time.perf_counter() - start
    start = time.perf_counter()
    white = 0
    for first in range(0, sprites.NUM_IMAGES, args.chunk):
        indices = np.arange(first, min(first + args.chunk, sprites.NUM_IMAGES))
        white += int(renderer.render(sprites.factors_of(indices)).sum(dtype=np.int64))
    grid_seconds = time.perf_counter() - start
    print(json.dumps({
        "image_size": args.image_size, "images": sprites.NUM_IMAGES, "template_seconds": round(template_seconds, 2),
        "template_megabytes": round(renderer.templates.nbytes / 2**20, 2), "grid_seconds": round(grid_seconds, 2),
        "images_per_second": round(sprites.NUM_IMAGES / grid_seconds), "mean_white_pixels": white / sprites.NUM_IMAGES,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
    }))


if __name__ == "__main__":
    main()
