"""Safe image input: bounded base64 decoding, decompression-bomb guard, RGB conversion."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from llava_serve.errors import ImageError, ImageTooLarge

_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 16_384
    max_count: int = 8


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image
    sha256: str


def decode_base64_image(data: str, limits: ImageLimits, index: int = 0) -> DecodedImage:
    """Decode one base64 (or data: URL) image, refusing oversize input before decompressing it."""
    if not isinstance(data, str):
        raise ImageError(f"image {index}: expected a base64 string, got {type(data).__name__}")
    payload = _DATA_URL.sub("", data.strip(), count=1)
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise ImageTooLarge(f"image {index}: more than {limits.max_bytes} bytes; send a smaller image")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"image {index}: not valid base64 ({exc})") from None
    return decode_image_bytes(raw, limits, index)


def decode_image_bytes(raw: bytes, limits: ImageLimits, index: int = 0) -> DecodedImage:
    if len(raw) > limits.max_bytes:
        raise ImageTooLarge(f"image {index}: {len(raw)} bytes, limit {limits.max_bytes}")
    if not raw:
        raise ImageError(f"image {index}: empty image data")
    try:
        img = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"image {index}: not a decodable image ({type(exc).__name__})") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(
            f"image {index}: too many pixels to decode safely (decompression-bomb guard); downscale it"
        ) from None
    _check_size(img.size, limits, index)
    try:
        img.load()
    except Image.DecompressionBombError:
        raise ImageTooLarge(
            f"image {index}: too many pixels to decode safely (decompression-bomb guard); downscale it"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"image {index}: truncated or corrupt image data ({exc})") from None
    return DecodedImage(image=to_rgb(img), sha256=hashlib.sha256(raw).hexdigest())


def _check_size(size: tuple[int, int], limits: ImageLimits, index: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"image {index}: has no pixels ({w}x{h})")
    if w > limits.max_side or h > limits.max_side or w * h > limits.max_pixels:
        raise ImageTooLarge(
            f"image {index}: {w}x{h} pixels exceeds the limit "
            f"({limits.max_pixels} pixels, {limits.max_side} per side); downscale it first"
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white (what a viewer shows)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[-1])
        return background
    return img.convert("RGB")


def encode_image_base64(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()
