"""Camera frames: JPEG/PNG bytes checked on arrival, decoded to RGB only for the turn that uses them."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from server.protocol import ErrorCode, ProtocolError

MAX_IMAGE_PIXELS = 4096 * 4096


def decode_image(data: bytes) -> Image.Image:
    """JPEG/PNG bytes -> RGB image, or ``ProtocolError`` (invalid_image) for anything else."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ("JPEG", "PNG"):
            raise ProtocolError(ErrorCode.INVALID_IMAGE, f"image format {image.format} is not JPEG or PNG")
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ProtocolError(ErrorCode.INVALID_IMAGE, f"image of {image.width}x{image.height} is too large")
        return image.convert("RGB")
    except Image.DecompressionBombError:
        raise ProtocolError(ErrorCode.INVALID_IMAGE, "image has too many pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):  # SyntaxError: a broken PNG chunk
        # their messages carry object reprs: not passed on
        raise ProtocolError(ErrorCode.INVALID_IMAGE, "not a readable JPEG/PNG image (unknown format, truncated or corrupt)") from None
