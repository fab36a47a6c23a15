"""Write a tiny image folder to try things on: 3 classes (reddish, greenish, bluish noise), 16x16 png.

    python make_images.py demo_images        # demo_images/train/<class>/*.png, demo_images/test/<class>/*.png
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(root: Path, train: int = 40, test: int = 10, size: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for channel, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 200, (size, size, 3))
                pixels[..., channel] += 12  # the class is the brightest channel, under heavy noise
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


if __name__ == "__main__":
    print(make_images(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_images")))
