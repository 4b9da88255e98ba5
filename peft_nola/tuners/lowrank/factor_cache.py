"""The inference factor cache: a model's adapters' factors kept between forward passes that need no gradient.

Serving code, apart from the training path: :class:`~peft_nola.tuners.lowrank.layer.LowRankLayer` asks the cache
before it builds factors and nothing else depends on it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

import torch

from ..._env import bytes_from_env

#: Default byte budget of a model's inference factor cache (:class:`FactorCache`); ``$PEFT_NOLA_FACTOR_CACHE_BYTES``
#: overrides it, :func:`~peft_nola.tuners.lowrank.model.set_factor_cache_budget` changes it on a model.
DEFAULT_FACTOR_CACHE_BYTES = 256 * 2**20
FACTOR_CACHE_ENV = "PEFT_NOLA_FACTOR_CACHE_BYTES"


def _budget_from_env() -> int:
    budget = bytes_from_env(FACTOR_CACHE_ENV, " (0 turns the cache off)", minimum=0)
    return DEFAULT_FACTOR_CACHE_BYTES if budget is None else budget


class FactorCache:
    """The factors of a model's adapters kept between forward passes that need no gradient (inference).

    Building factors is the costly part of an unmerged NOLA forward (a product with the basis), and NoRA's
    ``(A B - C₀) Vᵀ`` is one too; in inference they depend only on the adapter's tensors, so each is built once and
    reused until one of those tensors changes. An entry records, per tensor it was built from, the tensor's in-place
    version counter (bumped by optimizer steps, ``copy_``, ``load_state_dict``, quantization), its storage address
    and dtype (changed by ``.to()``, ``.half()``/``.float()`` and ``.data =``, e.g. ``vector_to_parameters``), and it
    keeps those storages alive: no other tensor can be given a stamped address while the entry exists, so a storage
    freed and its memory handed out again (a dtype round trip or parameters replaced twice with no forward between)
    cannot match. Any difference and the factors are built again, with the same computation and so the same bits.
    Tensors made under ``torch.inference_mode()`` (an adapter loaded there) have no version counter: their factors
    are never cached, built at every forward instead. Writes through ``tensor.data`` bypass the version counter and
    are not seen; modify adapters through the parameters themselves. Creating or deleting an adapter and
    ``train()`` drop entries outright.

    Bounded: least recently used adapters are evicted first, whole (all their layers), once the factors held exceed
    ``budget`` bytes (:data:`DEFAULT_FACTOR_CACHE_BYTES`, ``$PEFT_NOLA_FACTOR_CACHE_BYTES``, or
    :func:`set_factor_cache_budget`; 0 turns caching off). An adapter's factors cost what LoRA's A and B of the same
    rank cost.
    """

    def __init__(self, budget: Optional[int] = None):
        self.budget = _budget_from_env() if budget is None else budget
        # adapter -> {token: (stamp, factors, pins)}; pins: the stamped storages, kept alive with the entry
        self.entries: OrderedDict[str, dict[int, tuple]] = OrderedDict()
        self.sizes: dict[str, int] = {}
        self.nbytes = 0
        self._lock = threading.RLock()  # forwards from several threads share the cache (a threaded server)

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle of a model: a lock cannot be copied, a new one is made
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def usable(self) -> bool:
        """Whether factors may come from the cache now: no gradient wanted and not being traced by torch.compile
        (compiled graphs build factors inside the graph; the bookkeeping here is Python)."""
        return self.budget > 0 and not torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def lookup(self, token: int, adapter_name: str, stamp: tuple) -> Optional[tuple]:
        with self._lock:
            entry = self.entries.get(adapter_name)
            item = entry.get(token) if entry is not None else None
            if item is None or item[0] != stamp:
                return None
            self.entries.move_to_end(adapter_name)
            return item[1]

    def store(self, token: int, adapter_name: str, stamp: tuple, factors: tuple, pins: tuple = ()) -> None:
        """Keep ``factors`` under ``stamp``; ``pins`` (the stamped tensors' storages) are held with them."""
        with self._lock:
            nbytes = sum(t.numel() * t.element_size() for t in factors)
            if nbytes > self.budget:
                return
            self.discard(token, adapter_name)
            self.entries.setdefault(adapter_name, {})[token] = (stamp, factors, pins)
            self.entries.move_to_end(adapter_name)
            self.sizes[adapter_name] = self.sizes.get(adapter_name, 0) + nbytes
            self.nbytes += nbytes
            self.evict()

    def evict(self) -> None:
        """Drop least recently used adapters, whole, until the factors held fit the budget."""
        with self._lock:
            while self.nbytes > self.budget and self.entries:
                self.drop(next(iter(self.entries)))

    def discard(self, token: int, adapter_name: str) -> None:
        """Forget one layer's factors of ``adapter_name``."""
        with self._lock:
            entry = self.entries.get(adapter_name)
            if entry is None or token not in entry:
                return
            nbytes = sum(t.numel() * t.element_size() for t in entry.pop(token)[1])
            self.sizes[adapter_name] -= nbytes
            self.nbytes -= nbytes
            if not entry:
                self.drop(adapter_name)

    def drop(self, adapter_name: str) -> None:
        """Forget every layer's factors of ``adapter_name``."""
        with self._lock:
            self.entries.pop(adapter_name, None)
            self.nbytes -= self.sizes.pop(adapter_name, 0)

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.sizes.clear()
            self.nbytes = 0

