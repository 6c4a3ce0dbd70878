"""Label Studio's brush RLE (the `value.rle` of a `brushlabels` result; not COCO RLE).

The format, as Label Studio's frontend and `label_studio_sdk.converter.brush.decode_rle` read it:
a big-endian bit stream over the RGBA image flattened row-major (H·W·4 bytes),

    header   32 bits  number of values N (= H·W·4)
              5 bits  word size - 1 (here 8 bits per value)
           4 × 4 bits run-length field widths - 1 (here 3, 4, 8, 16)
    records  1 bit    1 = a run of one value, 0 = literal values
              2 bits  which field width w follows
              w bits  count - 1
             then one word (run) or count words (literal)

zero-padded to whole bytes, sent as a list of byte values. A mask is painted as 255 in all four
channels, so every run is at least 4 values long and only run records are needed.
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 8
FIELD_BITS = (3, 4, 8, 16)
_MAX_RUN = 1 << FIELD_BITS[-1]


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-D array -> (run lengths, run values)."""
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [values.size]]))
    return lengths, values[starts]


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """bool/0-1 mask [H, W] -> Label Studio brush RLE (list of ints 0..255)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty [H, W] array, got shape {mask.shape}")
    values = np.where(mask.ravel() != 0, 255, 0).astype(np.uint32)
    lengths, run_values = _runs(values)
    lengths = lengths * 4  # each pixel is 4 equal channel values

    # Runs longer than the widest field are split into full chunks plus a remainder.
    chunks = np.maximum(1, -(-lengths // _MAX_RUN))
    run_values = np.repeat(run_values, chunks)
    first = np.repeat(np.cumsum(chunks) - chunks, chunks)
    index_in_run = np.arange(chunks.sum()) - first
    lengths = np.repeat(lengths, chunks) - index_in_run * _MAX_RUN
    lengths = np.minimum(lengths, _MAX_RUN).astype(np.uint64)

    widths = np.asarray(FIELD_BITS, np.uint64)
    which = np.searchsorted(1 << widths, lengths).astype(np.uint64)  # smallest field with 2**w >= length
    w = widths[which]
    # One record: 1 | which (2 bits) | length - 1 (w bits) | value (8 bits), as an integer + its width.
    codes = ((np.uint64(1) << (w + np.uint64(2 + WORD_BITS))) | (which << (w + np.uint64(WORD_BITS)))
             | ((lengths - np.uint64(1)) << np.uint64(WORD_BITS)) | run_values.astype(np.uint64))
    nbits = (w + np.uint64(3 + WORD_BITS)).astype(np.int64)

    header = [(values.size * 4, 32), (WORD_BITS - 1, 5), *[(f - 1, 4) for f in FIELD_BITS]]
    codes = np.concatenate([np.asarray([c for c, _ in header], np.uint64), codes])
    nbits = np.concatenate([np.asarray([n for _, n in header], np.int64), nbits])

    shifts = np.arange(31, -1, -1, dtype=np.uint64)
    bits = ((codes[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)  # [records, 32]
    keep = np.arange(32)[None, :] >= (32 - nbits)[:, None]
    return np.packbits(bits[keep]).tolist()
