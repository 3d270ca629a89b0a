"""The kept index of a folder data set's files, in one file that processes map.

``FolderIndex`` holds a split's sorted relative paths, labels and sizes, and what the cheap
check compares; ``folders.build_index`` lists it, ``folders.open_index`` keeps it in the
run's workdir. The file is a magic line, a JSON header (with the fingerprint), then each
array raw at a 64-byte boundary (``ALIGN``), so that loading maps the arrays instead of reading them,
and the decoding workers of a host, handed a ``KeptIndex`` (the file's name and its
fingerprint), share one copy of its pages.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, NamedTuple

import numpy as np

INDEX_VERSION = 2
ALIGN = 64  # each array starts at a multiple of this many bytes


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class FolderIndex:
    """A split's files: relative paths (bytes, sorted as listed), labels and sizes, with
    what the cheap check compares (each listed folder's modification time).

    Kept as one file (:meth:`save`): a magic line, the JSON header, then each array raw
    at a 64-byte boundary (``ALIGN``), so :meth:`load` maps the arrays (``np.memmap``, read-only)
    instead of reading them. Every decoding worker of a host opens the same file and
    shares its pages (ImageNet's train index is about 56 MB), where a pickled index
    would cost each worker its own copy. ``file`` is the file it was saved to or loaded
    from (``None``: in memory only).
    """

    MAGIC = b"lsgd-jax folder index\n"
    ARRAYS = ("paths", "labels", "sizes")

    def __init__(self, *, root: str, classes: list[str], paths: np.ndarray,
                 labels: np.ndarray, sizes: np.ndarray, skipped: dict, stamps: dict,
                 file: str | None = None, fingerprint: str | None = None):
        self.root, self.classes = root, list(classes)
        self.paths = paths if isinstance(paths, np.memmap) else np.asarray(paths, np.bytes_)
        self.labels = labels if isinstance(labels, np.memmap) else np.asarray(labels, np.int32)
        self.sizes = sizes if isinstance(sizes, np.memmap) else np.asarray(sizes, np.int64)
        self.skipped, self.stamps = dict(skipped), dict(stamps)
        self.file, self._fingerprint = file, fingerprint

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode())

    def fingerprint(self) -> str:
        """SHA-256 of the class names, paths, labels and sizes (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = self._digest()
        return self._fingerprint

    def _digest(self) -> str:
        digest = hashlib.sha256(json.dumps(self.classes).encode())
        for array in (self.paths, self.labels, self.sizes):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def save(self, path: str) -> None:
        """Writes the index to ``path`` atomically (a temporary file, then a rename: a
        process that maps the old file keeps reading it whole)."""
        arrays = {name: np.ascontiguousarray(getattr(self, name)) for name in self.ARRAYS}
        meta: dict[str, Any] = {
            "version": INDEX_VERSION, "root": self.root, "classes": self.classes,
            "skipped": self.skipped, "stamps": self.stamps, "fingerprint": self.fingerprint(),
            "arrays": {name: {"dtype": a.dtype.str, "shape": list(a.shape)}
                       for name, a in arrays.items()}}
        header = json.dumps(meta).encode()  # offsets are a function of the header's length
        start = _aligned(len(self.MAGIC) + 8 + len(header))
        offsets = []
        for a in arrays.values():
            offsets.append(start)
            start = _aligned(start + a.nbytes)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(self.MAGIC + len(header).to_bytes(8, "little") + header)
            for offset, a in zip(offsets, arrays.values()):
                f.write(b"\0" * (offset - f.tell()))
                f.write(a.tobytes())
        os.replace(tmp, path)
        self.file = path

    @classmethod
    def load(cls, path: str, *, fingerprint: str | None = None) -> FolderIndex | None:
        """The index kept in ``path``, its arrays mapped; ``None`` when the file is
        missing, damaged or of another version.

        ``fingerprint``: the one it must have (a worker opening its parent's index); given,
        the arrays are not hashed again. Without it they are, and a file whose content does
        not match its header's fingerprint is damaged.
        """
        try:
            with open(path, "rb") as f:
                if f.read(len(cls.MAGIC)) != cls.MAGIC:
                    return None
                meta = json.loads(f.read(int.from_bytes(f.read(8), "little")).decode())
                start = f.tell()
            if meta.get("version") != INDEX_VERSION:
                return None
            size, arrays = os.path.getsize(path), {}
            start = _aligned(start)
            for name in cls.ARRAYS:
                spec = meta["arrays"][name]
                dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
                nbytes = dtype.itemsize * int(np.prod(shape))
                if start + nbytes > size:
                    return None
                arrays[name] = (np.memmap(path, dtype, mode="r", offset=start, shape=shape)
                                if nbytes else np.zeros(shape, dtype))
                start = _aligned(start + nbytes)
            index = cls(root=meta["root"], classes=meta["classes"], skipped=meta["skipped"],
                        stamps=meta["stamps"], file=path, fingerprint=meta["fingerprint"],
                        **arrays)
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None
        if fingerprint is not None:
            return index if fingerprint == meta["fingerprint"] else None
        return index if index._digest() == meta["fingerprint"] else None


class KeptIndex(NamedTuple):
    """How a decoding worker is handed its parent's index: the file and the fingerprint
    that the parent read from it (a few hundred bytes to pickle, not the arrays)."""
    file: str
    fingerprint: str

    def open(self) -> FolderIndex:
        index = FolderIndex.load(self.file, fingerprint=self.fingerprint)
        if index is None:
            raise FileNotFoundError(
                f"the folder index {self.file} is gone, damaged or no longer the one this run "
                f"opened (fingerprint {self.fingerprint[:12]}...); it was replaced while the "
                "run was reading it. Start the run again: it checks the folders and keeps a "
                "fresh index")
        return index
