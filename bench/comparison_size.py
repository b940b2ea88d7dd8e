"""Does comparing at a reduced size change the filter's verdict? Planted copies at 512 x 512.

The memorization filter compares a generated image with each guarded one at most
COMPARISON_SIZE x COMPARISON_SIZE (nudging_core/tiled_l2.py). This measures, for several
comparison sizes, how often the tiled-L2 verdict (threshold 0.1) differs from the verdict at the
full 512 x 512 resolution, on scikit-image photographs and edited versions of them:

  copies     the photo with noise (up to heavy), JPEG compression, blur, a brightness change, a
             shift of a few pixels, or a down-and-up resize (what a model's reproduction looks like)
  non-copies the other photographs, a mirror image, a 50/50 blend with another photograph, the
             photo's centre enlarged 1.5x (same subject, new framing), and the photo with one of its
             16 tiles replaced (a local edit: tiled L2 is meant NOT to call that a copy)

  python -m bench.comparison_size [--json bench/comparison_size.json]
"""
from __future__ import annotations

import argparse
import io
import json

import numpy as np
import torch
from PIL import Image, ImageFilter

from memorizer.data import _ITEMS, _prepare
from nudging_core.tiled_l2 import comparison_size, tiled_l2_matrix, to_comparison

SIZE = 512
SIZES = [16, 32, 48, 64, 96, 128, 256]
THRESHOLD = 0.1


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _noise(img: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img / 255.0 + rng.normal(0, sigma, img.shape), 0, 1).__mul__(255).round().astype(np.uint8)


def _shift(img: np.ndarray, px: int) -> np.ndarray:
    out = np.roll(img, (px, px), axis=(0, 1))
    out[:px], out[:, :px] = img[:px], img[:, :px]
    return out


def variants(photo: np.ndarray, others: list[np.ndarray], seed: int):
    """(kind, name, image) for the copies and non-copies of one photograph."""
    pil = Image.fromarray(photo)
    copies = [(f"noise {s}", _noise(photo, s, seed)) for s in (0.02, 0.05, 0.08, 0.25)]
    copies += [(f"jpeg q{q}", _jpeg(photo, q)) for q in (15, 40, 90)]
    copies += [(f"blur r{r}", np.asarray(pil.filter(ImageFilter.GaussianBlur(r)))) for r in (1, 2)]
    copies += [("brighter 0.04", np.clip(photo.astype(int) + 10, 0, 255).astype(np.uint8))]
    copies += [(f"shift {p}px", _shift(photo, p)) for p in (1, 2, 4)]
    copies += [("resized 0.5x and back", np.asarray(pil.resize((SIZE // 2, SIZE // 2), Image.BILINEAR)
                                                   .resize((SIZE, SIZE), Image.BILINEAR)))]
    edited = photo.copy()
    edited[:SIZE // 4, :SIZE // 4] = 255 - edited[:SIZE // 4, :SIZE // 4]
    non = [(f"other photo {i}", o) for i, o in enumerate(others)]
    crop = SIZE // 6
    non += [("mirror image", photo[:, ::-1].copy()), ("one tile inverted", edited),
            ("blend with another photo", ((photo.astype(int) + others[0].astype(int)) // 2).astype(np.uint8)),
            ("centre enlarged 1.5x", np.asarray(pil.crop((crop, crop, SIZE - crop, SIZE - crop))
                                                .resize((SIZE, SIZE), Image.BILINEAR)))]
    return [("copy", n, v) for n, v in copies] + [("non-copy", n, v) for n, v in non]


def run() -> dict:
    import skimage.data
    photos = [_prepare(getattr(skimage.data, fn)(), size=SIZE) for _name, fn, _caption in _ITEMS]
    rows = []
    for i, photo in enumerate(photos):
        for kind, name, image in variants(photo, [p for j, p in enumerate(photos) if j != i], seed=i):
            rows.append((i, kind, name, image))
    refs = torch.from_numpy(np.stack(photos))
    images = torch.from_numpy(np.stack([r[3] for r in rows]))
    own = torch.tensor([r[0] for r in rows])
    full = tiled_l2_matrix(images.float() / 255, refs)[torch.arange(len(rows)), own]
    result = {"images": len(rows), "full_size": SIZE, "threshold": THRESHOLD, "by_size": {}}
    full_flag = full < THRESHOLD
    for s in SIZES:
        hw = comparison_size((SIZE, SIZE), (SIZE, SIZE), size=s)
        d = tiled_l2_matrix(to_comparison(images, hw), to_comparison(refs, hw))[torch.arange(len(rows)), own]
        flag = d < THRESHOLD
        disagree = [f"{_ITEMS[r[0]][0]}: {r[2]} ({r[1]}, full {full[k]:.4f}, at {s}: {d[k]:.4f})"
                    for k, r in enumerate(rows) if bool(flag[k]) != bool(full_flag[k])]
        is_copy = torch.tensor([r[1] == "copy" for r in rows])
        result["by_size"][str(s)] = {
            "agreement": float((flag == full_flag).float().mean()),
            "flags_lost": int((full_flag & ~flag).sum()), "flags_added": int((~full_flag & flag).sum()),
            "copies_flagged": int((flag & is_copy).sum()), "non_copies_flagged": int((flag & ~is_copy).sum()),
            "max_distance_rise": float((d - full).max()), "disagreements": disagree}
    kinds = {}
    for k, r in enumerate(rows):
        kinds.setdefault(r[1], []).append(bool(full_flag[k]))
    result["full_size_flagged"] = {k: f"{sum(v)} of {len(v)}" for k, v in kinds.items()}
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the figures here as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = run()
    print(f"{result['images']} images vs their own photo at {SIZE}x{SIZE} (threshold {THRESHOLD}); flagged at "
          f"full size: {result['full_size_flagged']}")
    print("size  agreement  flags lost  flags added  copies flagged  non-copies flagged  max distance rise")
    for s, r in result["by_size"].items():
        print(f"{s:>4}  {r['agreement']:9.3f}  {r['flags_lost']:10d}  {r['flags_added']:11d}  {r['copies_flagged']:14d}  "
              f"{r['non_copies_flagged']:18d}  {r['max_distance_rise']:+.4f}")
        for line in r["disagreements"]:
            print("      differs:", line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
