"""Where the demo keeps uploads: a private folder of its own, removed when the demo stops."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gradio.utils import get_upload_folder
from PIL import Image

from llava_serve.web.config import WebConfig


@contextmanager
def private_uploads(config: WebConfig) -> Iterator[Path]:
    """For the process: uploads in a fresh 0700 folder (not the shared /tmp/gradio), and images
    over `max_upload_pixels` refused before decoding. GRADIO_TEMP_DIR set by the user wins."""
    Image.MAX_IMAGE_PIXELS = config.max_upload_pixels // 2  # Pillow refuses at twice this
    if os.environ.get("GRADIO_TEMP_DIR"):
        yield Path(os.environ["GRADIO_TEMP_DIR"])
        return
    folder = Path(tempfile.mkdtemp(prefix="llava-serve-web-"))
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    try:
        yield folder
    finally:
        del os.environ["GRADIO_TEMP_DIR"]
        shutil.rmtree(folder, ignore_errors=True)


def is_upload(path: str) -> bool:
    """True for a file inside Gradio's upload folder (what the demo may read and send)."""
    try:
        return Path(path).resolve().is_relative_to(Path(get_upload_folder()).resolve())
    except (OSError, ValueError):
        return False
