"""Lossy compression history, carried from a source image to the images made from it.

PS3.3 C.7.6.1.1.5: once Lossy Image Compression (0028,2110) is "01" it is never reset,
and an image derived from a lossy one is lossy too. radnode's derived series and
Secondary Captures dropped it, so a reader of a "derived" CT could not tell that its
source had been JPEG-compressed (conformance audit). A source counts as lossy when it
says so, or when it arrived in a transfer syntax that is lossy by definition.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset

#: Transfer syntaxes that are lossy by definition, with their Lossy Image Compression
#: Method (CID 7182 / PS3.3 C.7.6.1.1.5.1). JPEG 2000 and HTJ2K may be either, so they
#: count only when the source says "01".
LOSSY_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS Lossy (Near-Lossless)
}


@dataclass(frozen=True)
class LossyHistory:
    """What a lossy source says of its compression (either may be empty)."""

    ratios: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()


def lossy_history(sources: Iterable[Dataset]) -> LossyHistory | None:
    """The history of the first lossy source, or None when none was compressed lossily."""
    for source in sources:
        said = str(source.get("LossyImageCompression", "") or "").strip() == "01"
        meta = getattr(source, "file_meta", None)
        syntax = str(meta.get("TransferSyntaxUID", "") if meta is not None else "")
        by_syntax = LOSSY_TRANSFER_SYNTAXES.get(syntax)
        if not (said or by_syntax):
            continue
        ratios = tuple(str(r) for r in _values(source.get("LossyImageCompressionRatio")))
        methods = tuple(str(m) for m in _values(source.get("LossyImageCompressionMethod")))
        if not said:  # compressed in transit without saying so: its method is the syntax's
            ratios, methods = (), (by_syntax,)
        return LossyHistory(ratios, methods)
    return None


def mark_lossy(ds: Dataset, history: LossyHistory | None) -> None:
    """Give ``ds`` the history (nothing when ``history`` is None)."""
    if history is None:
        return
    ds.LossyImageCompression = "01"
    if history.ratios:
        ds.LossyImageCompressionRatio = list(history.ratios)
    if history.methods:
        ds.LossyImageCompressionMethod = list(history.methods)


def _values(value: object) -> list[object]:
    """A possibly multi-valued element's values as a list."""
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [value]
    return list(value)
