"""The one way lorex decodes a user's image file: its size is checked before any pixel is decoded.

A PNG or JPEG of a few kilobytes can declare a billion pixels (a decompression bomb). Every reader
of user images (ImageFolder, Market-1501, paired RGB-D / RGB-NIR folders) calls
:func:`decode_image`, which reads the header, refuses more than ``MAX_IMAGE_PIXELS`` pixels in one
line naming the file, and only then decodes. PIL's own bomb check stays on as a backstop; its
warning and error become the same one-line refusal.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from PIL import Image

from lorex.errors import LorexError

MAX_IMAGE_PIXELS = 4096 * 4096  # far above any image a ViT here takes; read at call time
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL refuses more than twice this on its own

T = TypeVar("T")


def _too_large(path: Path, size: str, limit: int) -> LorexError:
    return LorexError(f"{path}: image is {size} pixels, more than the limit {limit}")


def decode_image(path: str | Path, decode: Callable[[Image.Image], T]) -> T:
    """``decode(img)`` on the opened image once its header size is within the limit.

    Too large, unreadable, truncated or not an image: a LorexError naming ``path``.
    """
    path = Path(path)
    limit = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Over PIL's limit but under twice it PIL only warns: the check below refuses it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, found[1] if found else "too many", limit) from None
    except (OSError, ValueError, EOFError) as exc:
        raise LorexError(f"{path}: unreadable image ({type(exc).__name__})") from None
    with img:
        width, height = img.size
        if width * height > limit:
            raise _too_large(path, f"{width}x{height}", limit)
        try:
            return decode(img)
        except (OSError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise LorexError(f"{path}: unreadable image ({type(exc).__name__})") from None
