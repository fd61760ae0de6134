"""Run checkpoints: ``OUT/checkpoints/<run_id>.pt``, written atomically, read without running code.

A checkpoint holds tensors and plain data only: the model's and the optimizer's state dicts, the
epoch, the history (a list of dicts of numbers) and the timing sums. Nothing else is needed: a
run's data order, augmentation and dropout are seeded by ``(seed, rank, epoch)``, not carried in
RNG states, and its configuration is in the store. It is read with
``torch.load(weights_only=True)``, which refuses any other object, so a file planted under
``--out`` (run ids are predictable) cannot run code.

A checkpoint that cannot be used (not a checkpoint, truncated, planted, another run's, another
recipe's) is treated as absent: :func:`discard` moves it aside to ``<run_id>.pt.damaged`` (or
``.damaged.N``, never over an earlier one) and
returns the line that says so, and the run starts over from epoch 0.

Example::

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> p = Path(tempfile.mkdtemp()) / "run.pt"
    >>> save(p, {"model": {"w": torch.ones(2)}, "optimizer": {"state": {}, "param_groups": []},
    ...          "epoch": 0, "history": [], "elapsed": 1.0, "train_time": 1.0,
    ...          "train_images": 64})
    >>> state, problem = read(p)
    >>> state["epoch"], problem
    (0, None)
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from normlab.lab.outfiles import write_via

__all__ = ["save", "read", "discard", "REQUIRED"]

#: what every checkpoint holds, and its type
REQUIRED = {"model": dict, "optimizer": dict, "epoch": int, "history": list, "elapsed": float,
            "train_time": float, "train_images": int}


def save(path: Union[str, Path], state: dict[str, Any],
         before_rename: Optional[Callable[[], None]] = None) -> None:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename: a reader sees
    the old or the new checkpoint, never half of one. ``before_rename`` is called once the
    temporary file is written, just before the rename; when it raises (the loop's ownership
    check), the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(f: Any) -> None:
        torch.save(state, f)
        if before_rename is not None:
            before_rename()

    write_via(path, write)  # <name>.tmp<pid>.<hex>, then renamed


def read(path: Union[str, Path]) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """``(state, None)``; ``(None, None)`` when there is no checkpoint; ``(None, why)`` when the
    file is not a usable checkpoint (it is left where it is; see :func:`discard`)."""
    if os.path.exists(path) and not os.path.isfile(path):  # a planted FIFO would block the
        return None, "is not a regular file"  # read forever, a device (/dev/zero) never end
    try:
        with warnings.catch_warnings():  # torch's notes on a plain pickle's protocol
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None, None
    except Exception as e:  # noqa: BLE001 - weights_only runs no code: any failure is damage
        # (random bytes raise UnpicklingError, IndexError, KeyError or UnicodeDecodeError)
        return None, f"does not load ({_why(e)})"
    if not isinstance(state, dict):
        return None, f"holds a {type(state).__name__}, not a checkpoint's dict"
    wrong = [k for k, t in REQUIRED.items()
             if not isinstance(state.get(k), (float, int) if t is float else t)
             or isinstance(state.get(k), bool)]
    if wrong:
        return None, f"lacks or mistypes {', '.join(wrong)}"
    return state, None


def discard(path: Union[str, Path], why: str) -> str:
    """Move the unusable checkpoint ``path`` aside to ``<name>.damaged`` (kept for a look, never
    read again; ``<name>.damaged.1``, ``.2``, ... when one was moved there before) and return
    the line that says so."""
    path = Path(path)
    aside = path.with_name(path.name + ".damaged")
    n = 0
    while os.path.lexists(aside):  # an earlier one is kept too
        n += 1
        aside = path.with_name(f"{path.name}.damaged.{n}")
    try:
        os.replace(path, aside)
        where = f"moved to {aside.name}"
    except OSError as e:
        where = f"could not be moved aside: {e.strerror or type(e).__name__}"
    return f"checkpoint {str(path)!r} {why}; {where}; the run starts over from epoch 0"


#: the advice around the reason in torch.load's weights_only message
_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _why(e: BaseException) -> str:
    """The reason in a torch.load error: its first sentence, past torch's boilerplate (for a
    refused object: "Trying to load unsupported GLOBAL posix.system ...")."""
    lines = [ln.strip() for ln in str(e).splitlines()
             if ln.strip() and not ln.strip().startswith(_BOILERPLATE)]
    text = lines[0].split(". ")[0].rstrip(".") if lines else ""
    if isinstance(e, pickle.UnpicklingError) and "Weights only" in str(e):
        return f"refused by torch.load(weights_only=True): {text}"
    return f"{type(e).__name__}: {text}"[:300]
