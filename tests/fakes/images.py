"""Tiny real images for tests."""

from __future__ import annotations

import base64
import io

from PIL import Image


def png_bytes(color: str = "red", size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(color: str = "red") -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(color)).decode()
