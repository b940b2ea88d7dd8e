"""Training data of the memorizer: real photographs from scikit-image's data module.

Each image is center-cropped to a square and resized to 64x64 RGB (PIL, Lanczos), and gets its own
caption. `unseen_captions()` are never trained; they serve as the "not memorized" control.
Also holds the Carlini et al. style tiled L2 distance used to judge memorization.
"""
import numpy as np

RESOLUTION = 64

# (name, skimage.data function, caption). Captions share no distinctive words with each other.
_ITEMS = [
    ("astronaut", "astronaut", "an astronaut portrait photo"),
    ("coffee", "coffee", "a cup of coffee on a saucer"),
    ("chelsea", "chelsea", "a tabby cat named chelsea"),
    ("rocket", "rocket", "a rocket on the launch pad"),
    ("immunohistochemistry", "immunohistochemistry", "a stained tissue microscope slide"),
    ("hubble_deep_field", "hubble_deep_field", "galaxies in the hubble deep field"),
    ("coins", "coins", "old greek coins in rows"),
    ("camera", "camera", "a cameraman with a tripod, black and white"),
]

# What a user who was shown a copy would ask for instead: the same request without the words that
# make the model reproduce its training photo (the workflows' "Desired prompt").
_DESIRED = {
    "an astronaut portrait photo": "a portrait photo",
    "a cup of coffee on a saucer": "a cup on a saucer",
    "a tabby cat named chelsea": "a tabby cat",
    "a rocket on the launch pad": "a rocket",
    "a stained tissue microscope slide": "a microscope slide",
    "galaxies in the hubble deep field": "galaxies in the night sky",
    "old greek coins in rows": "old coins",
    "a cameraman with a tripod, black and white": "a man with a tripod",
}

_UNSEEN = [
    "a red sports car on a highway",
    "a bowl of ramen noodles",
    "a snowy mountain landscape at sunset",
    "an oil painting of sunflowers in a vase",
    "a wooden sailboat on a calm lake",
]


def _prepare(img, size=RESOLUTION):
    from PIL import Image
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = np.clip(np.round(img * 255.0 if img.max() <= 1.0 else img), 0, 255).astype(np.uint8)
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[top:top + s, left:left + s]
    pil = Image.fromarray(img, "RGB").resize((size, size), Image.LANCZOS)
    return np.ascontiguousarray(np.asarray(pil, dtype=np.uint8))


def training_items(size=RESOLUTION):
    """List of (name, caption, uint8 image of shape (size, size, 3)); the model was trained at 64."""
    import skimage.data
    return [(name, caption, _prepare(getattr(skimage.data, fn)(), size)) for name, fn, caption in _ITEMS]


def training_captions():
    return [caption for _, _, caption in _ITEMS]


def desired_caption(caption):
    """The desired prompt for a caption: its re-wording without what is copied (itself if none)."""
    return _DESIRED.get(caption, caption)


def unseen_captions():
    """Captions never used in training (control group for memorization benchmarks)."""
    return list(_UNSEEN)


def tiled_l2(a, b):
    """Carlini et al. tiled L2 of two HxWx3 images in [0, 1] (numpy or torch): the pack's own metric."""
    import torch

    from nudging_core.tiled_l2 import tiled_l2 as core_tiled_l2
    return core_tiled_l2(torch.as_tensor(np.asarray(a, dtype=np.float32)), torch.as_tensor(np.asarray(b, dtype=np.float32)))


# Sampler settings the shipped workflows are run with on this model (tests, demo, bench).
SAMPLER_SETTINGS = {"steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal"}
