"""Safe unpickling of data files that hold plain containers and numpy arrays.

Unpickling can run code: a pickle names the globals it calls. ``ArrayUnpickler`` accepts only
the few numpy globals that rebuild an array (and how Python 3 writes bytes), so a tampered file
cannot call arbitrary functions; any other global raises ``ForbiddenGlobal``. cifar.py reads the
official CIFAR files with it, after their checksums, and also when the checksums are skipped.
"""

from __future__ import annotations

import pickle
from typing import Any


class ArrayUnpickler(pickle.Unpickler):
    """Loads plain containers and numpy arrays only.

    A CIFAR batch or meta file needs nothing else, and refusing every other global means a tampered file
    cannot call arbitrary functions, even with the checksums skipped.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # numpy < 2 and the official files
        ("numpy._core.multiarray", "_reconstruct"),  # numpy >= 2
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol <= 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise ForbiddenGlobal(f"{module}.{name}")
        return super().find_class(module, name)


class ForbiddenGlobal(pickle.UnpicklingError):
    """A global outside ``ArrayUnpickler``'s allow-list; its message is ``module.name``."""
