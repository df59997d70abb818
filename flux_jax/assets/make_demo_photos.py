"""Regenerate demo_photos/ (next to this file) from scikit-image's bundled sample photos (run once; the results
are committed and ship as package data, see `flux_jax.commands.demo`).

    pip install scikit-image && python flux_jax/assets/make_demo_photos.py

Each photo is resized (Lanczos) so that it fills one of the demo's 192-px-area buckets (256x128, 192x192,
128x256) without upscaling, and saved small: JPEG (the two grayscale ones stay single-channel JPEGs, which the
cache converts to RGB and lists in its report). Captions are written next to them as .txt files; their words are
in `flux_jax.data.demo.DEMO_CORPUS`, so the tiny demo tokenizers keep them whole.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

# sample file -> (output name, output size (w, h), caption)
PHOTOS = {
    "astronaut.png": (
        "astronaut.jpg",
        (192, 192),
        "an astronaut in a white spacesuit smiling in front of an american flag",
    ),
    "coffee.png": ("coffee.jpg", (288, 192), "a cup of coffee on a saucer seen from above"),
    "chelsea.png": ("cat.jpg", (288, 192), "a ginger tabby cat looking at the camera"),
    "rocket.jpg": ("rocket.jpg", (192, 288), "a rocket standing on the launch pad under a blue sky"),
    "camera.png": ("cameraman.jpg", (192, 192), "a black and white photo of a man with a camera on a tripod"),
    "motorcycle_left.png": ("motorcycle.jpg", (285, 192), "a red motorcycle parked on a road"),
    "hubble_deep_field.jpg": ("hubble.jpg", (220, 192), "galaxies and stars of the hubble deep field"),
    "page.png": ("page.jpg", (256, 128), "a page of printed text photographed at an angle"),
}


def main() -> None:
    import skimage.data

    src = Path(os.path.dirname(skimage.data.__file__))
    out = Path(__file__).resolve().parent / "demo_photos"
    out.mkdir(exist_ok=True)
    for name, (target, size, caption) in PHOTOS.items():
        image = Image.open(src / name)
        image = image.convert("L" if image.mode == "L" else "RGB").resize(size, Image.Resampling.LANCZOS)
        path = out / target
        image.save(path, quality=75, optimize=True)
        path.with_suffix(".txt").write_text(caption + "\n")
        print(f"{path.name}: {image.size[0]}x{image.size[1]} {image.mode}, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
