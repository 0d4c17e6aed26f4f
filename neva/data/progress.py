"""Progress for long data work (writing datasets, scanning files)."""
from __future__ import annotations


def bar(total: int, what: str, on: bool):
    """A tqdm bar counting ``what`` (its last word is the unit), or one that shows nothing."""
    if on:
        from tqdm import tqdm

        return tqdm(total=total, desc=what, unit=what.split()[-1], leave=False)

    class _Null:
        def update(self, n=1): ...
        def close(self): ...

    return _Null()
