"""Rebuild the bundled sample: a dozen real photos shipped with scikit-image, hand-written captions,
as a LAION-style parquet (URL, TEXT, WIDTH, HEIGHT, NSFW, similarity) read through img2dataset.

URLs are relative ``file:`` URLs, resolved against this folder (configs allow file URLs for it).
Run: .venv/bin/python sample/make_sample.py
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from skimage import data

HERE = Path(__file__).parent

PHOTOS = [
    ("astronaut", data.astronaut, "portrait of an astronaut in a spacesuit in front of a flag"),
    ("coffee", data.coffee, "a cup of coffee on a saucer with a spoon, seen from above"),
    ("chelsea", data.chelsea, "chelsea the cat looking up, close-up"),
    ("rocket", data.rocket, "a rocket on the launch pad at dusk"),
    ("motorcycle", data.stereo_motorcycle, "a red motorcycle parked indoors"),
    ("camera", data.camera, "black and white photo of a cameraman with a tripod in a park"),
    ("coins", data.coins, "old coins laid out on a dark table"),
    ("horse", data.horse, "silhouette of a horse"),
    ("hubble", data.hubble_deep_field, "deep field image of distant galaxies in space"),
    ("moon", data.moon, "grayscale close-up of the surface of the moon with craters"),
    ("page", data.page, "a scanned page of printed text"),
    ("retina", data.retina, "medical photo of a human retina"),
]


def to_image(arr) -> Image.Image:
    if arr.dtype == bool:
        arr = (~arr).astype("uint8") * 255  # horse: silhouette in black on white
    img = Image.fromarray(arr)
    img.thumbnail((640, 640))
    return img


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    rows = []
    for name, fn, caption in PHOTOS:
        arr = fn()
        if isinstance(arr, tuple):  # stereo_motorcycle returns (left, right, disparity)
            arr = arr[0]
        img = to_image(arr)
        img.save(HERE / "images" / f"{name}.jpg", quality=88)
        rows.append(
            {
                "URL": f"file:images/{name}.jpg",
                "TEXT": caption,
                "WIDTH": img.size[0],
                "HEIGHT": img.size[1],
                "NSFW": "UNLIKELY",
                "similarity": 0.33,
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), HERE / "pairs.parquet")
    print(f"wrote {len(rows)} pairs to {HERE / 'pairs.parquet'}")


if __name__ == "__main__":
    main()
