"""Making a restored data loader continue exactly where the saved one was.

Two things beside the loader's own ``state_dict`` decide what a resumed run sees:

* **The global torch RNG.** A loader draws seeds from the global generator (without a
  ``generator=``) when an iterator is created. An uninterrupted run made that draw at the start of
  the epoch, before the checkpoint captured the RNG; the resumed run makes it again right after
  the RNG was restored, so every random op after the resume (Dropout masks) would shift.
* **The loader's own ``generator``.** torchdata's ``StatefulDataLoader`` restores its sampler's
  position, but not every draw from the generator the user passed (with ``num_workers=0`` the
  next epoch's order would differ).

So the first ``iter()`` after a restore runs with both generators put back, afterwards, to what
they were at the save: its draws leave no trace, and everything that follows matches.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


def loader_generator_state(loader: Any) -> torch.Tensor | None:
    """The state of the loader's ``generator=`` (None when it has none)."""
    gen = getattr(loader, "generator", None)
    return gen.get_state() if isinstance(gen, torch.Generator) else None


def restore_loader(loader: Any, state: Any) -> None:
    """The loader's position from its saved ``state_dict`` (nothing saved: nothing to do)."""
    if state is None:
        return
    if hasattr(loader, "load_state_dict"):
        loader.load_state_dict(state)
    else:
        logger.warning(
            "checkpoint: the saved data position cannot be applied: %s has no load_state_dict()",
            type(loader).__qualname__,
        )


def guard_first_iter(loader: Any, generator_state: torch.Tensor | None) -> None:
    """Make the loader's next ``iter()`` leave the torch RNGs as they are now (and its
    ``generator`` as saved). One-shot: the loader's class is swapped back at that call."""
    cls = type(loader)
    if getattr(cls, "_kempnerforge_guarded", False):
        return

    def __iter__(self: Any) -> Any:
        self.__class__ = cls
        cpu = torch.get_rng_state()
        cuda = (
            torch.cuda.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None
        )
        try:
            return cls.__iter__(self)
        finally:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda)
            gen = getattr(self, "generator", None)
            if generator_state is not None and isinstance(gen, torch.Generator):
                gen.set_state(generator_state)

    guarded = type(
        cls.__name__,
        (cls,),
        {"__iter__": __iter__, "_kempnerforge_guarded": True, "__module__": cls.__module__},
    )
    guarded.__qualname__ = cls.__qualname__
    try:
        loader.__class__ = guarded
    except TypeError as e:  # e.g. a C-level type: report, do not fail the resume
        logger.warning(
            "checkpoint: cannot keep %s's first iter() after the resume from drawing on the "
            "global RNG (%s); random ops may shift after the resume. Pass generator="
            "torch.Generator() to the loader to make its draws independent.",
            cls.__qualname__,
            e,
        )
