"""Images as encoded bytes: the only form they take in built Parquet splits (never pickled objects).

A stage turns a row's `image` cell into a picture with `load_image(cell)`; the builders use
`encode_png` and `inspect_image`. Pure functions on bytes, no file system.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# Errors PIL raises on truncated, corrupt or hostile input (DecompressionBombError derives from
# Exception only, so it is listed).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def load_image(data: bytes) -> Image.Image:
    """Encoded image bytes (a built split's `image` cell) -> a decoded RGB PIL image."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected encoded image bytes, got {type(data).__name__}")
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")  # convert() decodes fully and detaches from the buffer


def encode_png(img: Image.Image) -> bytes:
    """Lossless PNG bytes of a PIL image (the form generated images are stored in)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def inspect_image(data: bytes) -> ImageInfo:
    """Format and size of encoded bytes, after checking them twice: `verify()` checks the container
    (PNG chunk checksums, a cut-off end) and a full decode catches what it misses (truncated JPEG data),
    so a broken file fails here rather than in the middle of training. Raises ValueError."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:  # verify() leaves the image unusable: open it again
            img.load()
            return ImageInfo(format=str(img.format), width=img.width, height=img.height)
    except UnidentifiedImageError:  # its own message names a BytesIO object, which helps nobody
        raise ValueError("unreadable image (not a format PIL recognises, or a corrupt header)") from None
    except _DECODE_ERRORS as exc:
        raise ValueError(f"unreadable image ({type(exc).__name__}: {exc})") from None


def decode_base64(text: str) -> bytes:
    """Strict base64 (whitespace and a `data:image/...;base64,` prefix allowed). Raises ValueError."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())  # MIME encoders wrap lines; strict mode would refuse the newlines
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image bytes are not valid base64 ({exc})") from None


def summarize_images(blobs) -> dict:
    """Formats and the size range of encoded images, from their headers only (no pixel decoding)."""
    formats: dict[str, int] = {}
    widths, heights = [], []
    for data in blobs:
        with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header
            formats[str(img.format)] = formats.get(str(img.format), 0) + 1
            widths.append(img.width)
            heights.append(img.height)
    if not widths:
        return {"count": 0}
    return {
        "count": len(widths),
        "formats": dict(sorted(formats.items())),
        "min_size": [min(widths), min(heights)],
        "max_size": [max(widths), max(heights)],
    }
