"""A large volume that the kernel may take out of memory while the model runs.

Why: a job holds the decoded series (int16 for CT) from the first read to the last
written result, because the writers need its voxels again at the end (the SR's
per-segment statistics, the key images of the Secondary Captures). In between, the
bundle works on its own float32 copy, twice as large. Profiled on a 300-slice CT
(``bench/memory.py``), the peak was in ``Spacingd``: the int16 volume, the float32
input and the resampling grid together, 4.5x the decoded volume above the model.

So the decoded array of a large volume lives in a shared map of an unlinked scratch
file in the job's result folder, and :func:`page_out` drops its pages from the
process once the float32 copy is made. Nothing is lost: the pages stay in the page
cache, which the kernel reclaims under pressure (writing them to the scratch file
first) and which serves them back when the writers touch the array again. The file's
blocks are reserved up front (``posix_fallocate``), so a full disk is an error here,
not a SIGBUS later; without room the array is an ordinary one in memory.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

#: Below this, a volume is simply kept in memory (a radiograph, a short series).
MIN_FILE_BACKED_BYTES = 64 * 1024 * 1024


def empty_volume(shape: tuple[int, ...], dtype: Any, scratch_dir: Path | None) -> NDArray[Any]:
    """An uninitialised array of ``shape``: file-backed in ``scratch_dir`` when it is
    large and a scratch folder is given, else in memory."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if scratch_dir is None or nbytes < MIN_FILE_BACKED_BYTES:
        return np.empty(shape, dtype=dtype)
    try:
        scratch_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=scratch_dir, prefix="volume-") as scratch:
            os.posix_fallocate(scratch.fileno(), 0, nbytes)
            # The map keeps the unlinked file alive; it goes with the last view.
            mapped = mmap.mmap(scratch.fileno(), nbytes)
    except OSError:
        return np.empty(shape, dtype=dtype)  # no room on disk: memory it is
    return np.frombuffer(mapped, dtype=dtype).reshape(shape)


def page_out(array: NDArray[Any]) -> bool:
    """Drop a file-backed array's pages from this process (they stay in the page cache
    and come back when touched); False, doing nothing, for an array in memory.

    ``array`` may be a contiguous part of the volume (a slab already copied): only the
    whole pages inside it are dropped."""
    found = _mapping_of(array)
    advice = getattr(mmap, "MADV_DONTNEED", None)  # Linux (and most Unixes)
    if found is None or advice is None or not array.flags.c_contiguous:
        return False
    mapped, map_address = found
    offset = array.__array_interface__["data"][0] - map_address
    first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only
    end = (offset + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end <= first:
        return False
    with contextlib.suppress(OSError, ValueError):
        mapped.madvise(advice, first, end - first)
        return True
    return False


def is_file_backed(array: NDArray[Any]) -> bool:
    return _mapping_of(array) is not None


def _mapping_of(array: NDArray[Any]) -> tuple[mmap.mmap, int] | None:
    """The map under ``array`` and the address where it starts."""
    base: Any = array
    while isinstance(base, np.ndarray):
        if isinstance(base.base, memoryview) and isinstance(base.base.obj, mmap.mmap):
            # the array np.frombuffer made over the whole map
            return base.base.obj, int(base.__array_interface__["data"][0])
        base = base.base
    return None
