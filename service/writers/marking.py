"""An overlay plane that marks a derived image as an AI result, pixels untouched.

Why: a denoised CT looks like an acquired one. Its Series Description says "AI derived,
not for diagnosis", but a viewer that shows no description overlay, or a hanging
protocol that picks "CT axial abdomen", showed it as the scanner's (acceptance pass).
Burning text into the pixels would change the values a reader measures; a DICOM
Overlay Plane (PS3.3 C.9.2), which viewers draw over the image and can hide, says it
on every image instead. Burned In Annotation stays NO.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

#: The overlay group used (60xx, PS3.3 C.9.2); left alone when the source has one.
OVERLAY_GROUP = 0x6000


def mark_as_ai_result(ds: Dataset, text: str) -> bool:
    """Add an overlay with ``text`` in the top left corner of single-frame ``ds``.

    Returns False (and adds nothing) for a multi-frame image, or when the copied source
    header already has an overlay in that group: its own stays as it was.
    """
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return False
    if len(ds.group_dataset(OVERLAY_GROUP)):
        return False
    rows, columns = int(ds.Rows), int(ds.Columns)
    group = OVERLAY_GROUP
    ds.add_new((group, 0x0010), "US", rows)
    ds.add_new((group, 0x0011), "US", columns)
    ds.add_new((group, 0x0022), "LO", text[:64])  # Overlay Description
    ds.add_new((group, 0x0040), "CS", "G")  # graphics
    ds.add_new((group, 0x0050), "SS", [1, 1])  # origin: the first row and column
    ds.add_new((group, 0x0100), "US", 1)  # Overlay Bits Allocated
    ds.add_new((group, 0x0102), "US", 0)  # Overlay Bit Position
    ds.add_new((group, 0x1500), "LO", "AI")  # Overlay Label
    ds.add_new((group, 0x3000), "OW", _packed_text(rows, columns, text))
    return True


@functools.lru_cache(maxsize=8)
def _packed_text(rows: int, columns: int, text: str) -> bytes:
    """``text`` drawn on a ``rows`` x ``columns`` bitmap, packed a bit a pixel, first
    pixel in the lowest bit (PS3.5 8.1.2), padded to an even length. The same for every
    image of a series: made once."""
    size = max(10, columns // 40)
    font = ImageFont.load_default(size=size)
    bitmap = Image.new("1", (columns, rows), 0)
    ImageDraw.Draw(bitmap).text((size // 2, size // 2), text, fill=1, font=font)
    bits = np.asarray(bitmap, dtype=np.uint8).ravel()
    packed = np.packbits(bits, bitorder="little").tobytes()
    return packed + b"\0" if len(packed) % 2 else packed
