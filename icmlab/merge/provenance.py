"""Merge's provenance sidecar ``train.provenance.jsonl``: its writer and its reader.

Line ``i`` of the sidecar describes record ``i`` of the merged ``train.json``:
``{"source": NAME, "file": REL, "index": K, "copy": C}``; the merge stage writes it with
:class:`ProvenanceLines` (byte tables, no per-line Python), and the validate and inspect stages read it
back with :func:`read_provenance`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson


class ProvenanceLines:
    """The sidecar's lines ``prefix + str(i) + b"}\\n"``, built without per-line Python.

    Sorted indices put the lines with the same number of digits next to each other, and those are
    equally long: they are the rows of a byte table. The table is kept from call to call, so a
    block of indices only rewrites its digit columns.
    """

    def __init__(self) -> None:
        self._key: tuple[bytes, int] | None = None
        self._table = np.zeros((0, 0), np.uint8)

    def build(self, prefix: bytes, indices: np.ndarray) -> list[np.ndarray]:
        """Tables whose rows are the lines for ``indices`` (non-negative, increasing), in order.

        Write them as they are (``b"".join(t.tobytes() for t in tables)`` is the text); they are
        valid until the next call.
        """
        idx = np.asarray(indices, np.int64)
        if not idx.size:
            return []
        digits = np.maximum(1, np.searchsorted(_POW10, idx, side="right"))
        cuts = (np.flatnonzero(digits[1:] != digits[:-1]) + 1).tolist()
        tables = []
        for lo, hi in zip([0, *cuts], [*cuts, idx.size]):
            d = int(digits[lo])
            rows = self._rows(prefix, d, hi - lo)
            rest = idx[lo:hi]
            for j in range(d):  # the digits, last first
                rest, digit = np.divmod(rest, 10)
                rows[:, len(prefix) + d - 1 - j] = digit + 48
            tables.append(rows)
        return tables

    def _rows(self, prefix: bytes, digits: int, n: int) -> np.ndarray:
        if self._key != (prefix, digits) or len(self._table) < n:
            line = prefix + b"0" * digits + b"}\n"
            rows = max(n, len(self._table))  # blocks hold about the same number of records
            self._table = np.frombuffer(bytearray(line * rows), np.uint8).reshape(rows, len(line))
            self._key = (prefix, digits)
        return self._table[:n]


_POW10 = 10 ** np.arange(19, dtype=np.int64)


def read_provenance(path: Path | None) -> tuple[np.ndarray, list[str], np.ndarray] | None:
    """Dataset code per record, the code names, and merge's repeat flags, from merge's sidecar."""
    if path is None or not Path(path).is_file():
        return None
    names: dict[str, int] = {}
    codes, repeats = [], []
    with open(path, "rb") as f:
        for line in f:
            row = orjson.loads(line)
            codes.append(names.setdefault(row.get("source", "?"), len(names)))
            repeats.append(row.get("copy", 0) > 0)
    return np.array(codes, np.int32), list(names), np.array(repeats, bool)
