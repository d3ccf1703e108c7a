"""Reading a cmrprep store for training: one opened version, O(1) weighted draws, a shard pool.

Nothing here imports Keras or a deep-learning framework: the Keras, PyTorch and
tf.data datasets (`model.tf_data`) are thin layers over these classes.

* :class:`ShardStore` opens one store *version* (``OUT/store.zarr`` is a link
  that a later build swaps; the link is resolved once, so a reader never mixes
  two versions) and keeps its arrays open.  Small stores are held in memory in
  their stored dtype (float16 by default); larger ones are read shard by shard.
* :class:`AliasTable` draws indices by weight in O(1) per draw (Walker/Vose
  alias method, built in O(n) with NumPy once).
* :class:`ShardPool` is a streaming sampler in the spirit of TorchIO's
  ``Queue``: for each *round* of batches it draws a pool of shards, each with
  probability proportional to the sampling weight it holds, and draws the
  round's slices within the pool.  Each draw then has exactly the store's
  weighted distribution (see the class docstring); memory holds at most two
  pools, whatever the store size, and the next pool is read in the background.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cmrprep.cases import CLASSES
from cmrprep.plan import ConfigError

__all__ = ["StoreError", "AliasTable", "ShardStore", "ShardPool", "resolve_store_path",
           "split_by_patient", "split_patients", "class_weight_table"]

log = logging.getLogger(__name__)

NUM_CLASSES = len(CLASSES)  # the default (ACDC) class set; a store's own: ShardStore.num_classes
REQUIRED_ARRAYS = ("images", "labels", "weights", "case_index")
#: Stores whose images + labels (in their stored dtypes) fit in this many bytes are held in
#: memory by default; larger ones are streamed through a :class:`ShardPool`.
DEFAULT_MEMORY_BUDGET = 2 * 1024**3
#: Slices a pool holds by default: ``pool_shards`` defaults to this many slices' worth of
#: shards (16 shards of 256 slices, 64 of 64; two pools of 128x128 float16 + uint8 are ~400 MB).
DEFAULT_POOL_SLICES = 4096
#: ``pool_shards=None``: :data:`DEFAULT_POOL_SLICES` worth of shards.
DEFAULT_POOL_SHARDS = None
_POOL_TAG = 0x5A4D  # domain separation of the pool's seeds from the batches' seeds


class StoreError(ConfigError):
    """The store cannot be used for training; the message names the array and the fix."""


def resolve_store_path(path: str | Path) -> Path:
    """Return the ``store.zarr`` path; accepts the build output folder or the store itself."""
    p = Path(path)
    if (p / "store.zarr" / "zarr.json").exists():
        return p / "store.zarr"
    if (p / "zarr.json").exists():
        return p
    raise StoreError(f"no cmrprep store at {path}: expected {p}/store.zarr/zarr.json; "
                     "run `python -m pipelines.build RAW OUT` first")


class AliasTable:
    """Weighted sampling of ``range(n)`` in O(1) per draw (Walker's alias method).

    Parameters
    ----------
    weights : array-like of shape (n,)
        Non-negative weights, not all zero; index ``i`` is drawn with
        probability ``weights[i] / weights.sum()``.

    Notes
    -----
    Vose's construction, vectorised: every round pairs all current "small"
    columns (scaled weight < 1) with the "large" ones whose surplus covers
    them, found by a cumulative-sum search, so the table is built in a few
    NumPy passes instead of a Python loop over ``n`` items.

    Examples
    --------
    >>> t = AliasTable([1.0, 0.0, 3.0])
    >>> draws = t.sample(np.random.default_rng(0), 100_000)
    >>> bool(abs((draws == 2).mean() - 0.75) < 0.01), int((draws == 1).sum())
    (True, 0)
    """

    def __init__(self, weights: Any) -> None:
        w = np.asarray(weights, dtype=np.float64).ravel()
        if w.size == 0 or not np.all(np.isfinite(w)) or (w < 0).any() or not w.sum() > 0:
            raise ValueError("alias table weights must be finite, >= 0 and not all 0")
        self.n = w.size
        self.prob, self.alias = _alias(w)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` indices drawn with replacement (int64)."""
        col = rng.integers(0, self.n, size=size)
        keep = rng.random(size) < self.prob[col]
        return np.where(keep, col, self.alias[col]).astype(np.int64, copy=False)

    def probabilities(self) -> np.ndarray:
        """The distribution the table encodes (equals the normalised weights up to rounding)."""
        p = self.prob.copy()
        np.add.at(p, self.alias, 1.0 - self.prob)
        return p / self.n


def _alias(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = w.size
    q = w * (n / w.sum())
    prob, alias = np.ones(n), np.arange(n, dtype=np.int64)
    small, large = np.flatnonzero(q < 1.0), np.flatnonzero(q >= 1.0)
    while small.size and large.size:
        deficit = 1.0 - q[small]
        start = np.cumsum(deficit) - deficit          # where each small column's deficit begins
        ends = np.cumsum(q[large] - 1.0)              # where each large column's surplus ends
        owner = np.searchsorted(ends, start, side="right")
        ok = owner < large.size
        if not ok.any():  # only rounding residue is left
            break
        done, own = small[ok], owner[ok]
        prob[done], alias[done] = q[done], large[own]
        q[large] -= np.bincount(own, weights=deficit[ok], minlength=large.size)
        spent = q[large] < 1.0                        # a large that gave more than its surplus
        small = np.concatenate([small[~ok], large[spent]])
        large = large[~spent]
    prob[small] = 1.0  # residue of rounding: these columns keep their own mass
    return prob, alias


class ShardStore:
    """Read-only access to one version of a slice store.

    Parameters
    ----------
    path : str or Path
        Build output folder containing ``store.zarr``, or the store itself.
        The ``store.zarr`` link is resolved once: a build that publishes a new
        version meanwhile does not change what this reader sees (the build
        keeps the previous version on disk).
    memory_budget : int
        Bytes allowed for ``images`` + ``labels`` in their stored dtypes; a
        store that fits is held in memory (``mode="auto"``).
    cache_shards : int
        Shards kept by :meth:`get` when streaming (sequential reads such as
        validation need one or two).
    mode : {"auto", "memory", "stream"}
        Force in-memory or streamed access.

    Notes
    -----
    Images are kept in the stored dtype and converted to float32 per request.
    The metadata arrays (``weights``, ``case_index``, ``class_counts``) are
    read once; the group's attributes are parsed once.
    """

    def __init__(self, path: str | Path, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 cache_shards: int = 2, mode: str = "auto") -> None:
        import zarr

        if mode not in ("auto", "memory", "stream"):
            raise ConfigError(f"mode must be auto, memory or stream, got {mode!r}")
        self.link = resolve_store_path(path)
        self.path = self.link.resolve()  # the version directory, fixed for this reader
        self.memory_budget, self.cache_shards = int(memory_budget), max(1, int(cache_shards))
        root = zarr.open_group(str(self.path), mode="r")
        self.array_names = sorted(root.array_keys())
        missing = [a for a in REQUIRED_ARRAYS if a not in self.array_names]
        if missing:
            raise StoreError(f"store {self.path} lacks array(s) {missing}; rebuild it with "
                             "`python -m pipelines.build` (sampling weights are written by the build)")
        self.attrs: dict[str, Any] = dict(root.attrs)
        self._table_attrs: dict[str, Any] | None = None
        self.classes: tuple[str, ...] = tuple(self.attrs.get("classes") or CLASSES)
        self.num_classes = len(self.classes)
        self.weights = self._read_weights(root)
        self.case_index = np.asarray(root["case_index"][...], dtype=np.int64)
        self.class_counts = (np.asarray(root["class_counts"][...], dtype=np.int64)
                             if "class_counts" in self.array_names else None)
        images, labels = root["images"], root["labels"]
        self.n_slices, self.slice_shape = int(images.shape[0]), tuple(images.shape[1:])
        self.image_dtype = np.dtype(images.dtype)
        self._check_shapes(labels)
        self.shard_len = int(images.shards[0] if images.shards else images.chunks[0])
        self.n_shards = -(-self.n_slices // self.shard_len)
        nbytes = images.nbytes + labels.nbytes
        self.in_memory = mode == "memory" or (mode == "auto" and nbytes <= self.memory_budget)
        self._arrays: tuple[Any, Any] | None = (images, labels)
        self._images = self._labels = None
        if self.in_memory:
            self._images = np.asarray(images[...])
            self._labels = np.asarray(labels[...], dtype=np.uint8)
            _check_labels(self._labels, str(self.path), self.num_classes)
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        padding = int(np.count_nonzero(self.case_index < 0))  # rows that keep groups shard-aligned
        log.info("store %s: %d slices %s (+%d padding rows), %s", self.path, self.n_slices - padding,
                 self.slice_shape, padding,
                 "in memory" if self.in_memory else f"streamed ({self.shard_len} slices/shard)")

    def _read_weights(self, root: Any) -> np.ndarray:
        w = np.asarray(root["weights"][...], dtype=np.float64)
        if w.ndim != 1 or not np.all(np.isfinite(w)) or (w < 0).any() or not w.sum() > 0:
            raise StoreError(f"store {self.path}: `weights` must be finite, >= 0 and not all 0; "
                             "rebuild the store")
        return w

    def _check_shapes(self, labels: Any) -> None:
        n = self.n_slices
        if tuple(labels.shape) != (n, *self.slice_shape):
            raise StoreError(f"labels shape {labels.shape} != images shape {(n, *self.slice_shape)}")
        for name, arr in (("weights", self.weights), ("case_index", self.case_index)):
            if arr.shape[0] != n:
                raise StoreError(f"`{name}` has {arr.shape[0]} entries for {n} slices")
        c = self.num_classes
        if self.class_counts is not None and self.class_counts.shape != (n, c):
            raise StoreError(f"`class_counts` shape {self.class_counts.shape} != ({n}, {c}) for the "
                             f"store's classes {list(self.classes)}; rebuild the store")

    # -- slice access ----------------------------------------------------------
    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (k, H, W) float32 and labels (k, H, W) uint8 of slice ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_slices):
            raise IndexError(f"slice index out of range 0..{self.n_slices - 1}")
        if self.in_memory:
            return self._images[idx].astype(np.float32), self._labels[idx]
        images = np.empty((idx.size, *self.slice_shape), dtype=np.float32)
        labels = np.empty((idx.size, *self.slice_shape), dtype=np.uint8)
        shard_of = idx // self.shard_len
        for shard in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == shard)
            img, lab = self._cached_shard(int(shard))
            local = idx[sel] - shard * self.shard_len
            images[sel], labels[sel] = img[local], lab[local]
        return images, labels

    def read_shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """One whole shard (stored dtypes), read from disk or from memory."""
        lo, hi = shard * self.shard_len, min((shard + 1) * self.shard_len, self.n_slices)
        if self.in_memory:
            return self._images[lo:hi], self._labels[lo:hi]
        if not self.path.is_dir():
            raise StoreError(f"store version {self.path} was removed (later builds keep only the "
                             "newest versions); reopen the store")
        images, labels = self._open_arrays()
        block = np.asarray(images[lo:hi]), np.asarray(labels[lo:hi], dtype=np.uint8)
        _check_labels(block[1], f"{self.path} slices {lo}..{hi - 1}", self.num_classes)
        return block

    def _open_arrays(self) -> tuple[Any, Any]:
        if self._arrays is None:  # after unpickling in a loader worker process
            import zarr

            root = zarr.open_group(str(self.path), mode="r")
            self._arrays = (root["images"], root["labels"])
        return self._arrays

    def _cached_shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if shard in self._cache:
                self._cache.move_to_end(shard)
                return self._cache[shard]
        block = self.read_shard(shard)
        with self._lock:
            self._cache[shard] = block
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        return block

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock")
        state["_arrays"] = None  # reopened by path (the same version) where it is needed
        state["_cache"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- metadata --------------------------------------------------------------
    def foreground_slices(self) -> np.ndarray:
        """Boolean (N,) mask of slices with any foreground (from ``class_counts``)."""
        if self.class_counts is None:
            raise StoreError("store lacks `class_counts`; rebuild it")
        return self.class_counts[:, 1:].sum(axis=1) > 0

    def _case_table_attrs(self) -> dict[str, Any]:
        if "case_table" not in self.array_names:
            return {}
        if self._table_attrs is None:
            import json

            self._table_attrs = json.loads((self.path / "case_table" / "zarr.json").read_text())["attributes"]
        return self._table_attrs

    def case_ids(self) -> list[str]:
        """Case id of each ``case_index`` value (from the store's ``case_table``)."""
        table = self._case_table_attrs()
        if table:
            return list(table["case_ids"])
        return [c.get("case_id", str(i)) if isinstance(c, dict) else str(c)
                for i, c in enumerate(self.attrs.get("cases") or [])]

    def patients(self) -> list[str]:
        """Patient id of each ``case_index`` value (the case id where the store names none)."""
        ids = self.case_ids()
        patients = self._case_table_attrs().get("patients") or [
            c.get("patient") if isinstance(c, dict) else None for c in self.attrs.get("cases") or []]
        if len(patients) != len(ids):
            return ids
        return [p or cid for p, cid in zip(patients, ids)]

    def check_attrs(self) -> dict[str, Any]:
        """Store attributes plus ``arrays`` (array names), for :func:`model.checks.check_wiring`."""
        return {**self.attrs, "arrays": list(self.array_names)}


def _check_labels(labels: np.ndarray, where: str, num_classes: int = NUM_CLASSES) -> None:
    if labels.size and int(labels.max()) >= num_classes:
        bad = np.unique(labels[labels >= num_classes])[:5].tolist()
        raise StoreError(f"labels in {where} contain values {bad} outside 0..{num_classes - 1}; "
                         "rebuild the store (label remapping/interpolation went wrong)")


def split_by_patient(store: ShardStore, val_fraction: float = 0.2,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split slice indices by patient so that no patient is in both parts.

    The store records each case's patient (``case_table`` attribute
    ``patients``); a patient's cases (images grouped or not) all go to one
    side.  Stores without patients split by case.

    Parameters
    ----------
    store : ShardStore
        Provides ``case_index``.
    val_fraction : float
        Share of patients (not slices) for validation, in [0, 1); rounded, at
        least one case when > 0.
    seed : int
        Seed of the patient permutation.

    Returns
    -------
    train_idx, val_idx : ndarray of int64
        Sorted slice indices (padding slices, ``case_index == -1``, in neither).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    cases = np.unique(store.case_index[store.case_index >= 0])  # -1: padding slices
    patient_of = _patient_codes(store, cases)
    patients = np.unique(patient_of[cases])
    n_val = 0 if val_fraction == 0 else max(1, int(round(val_fraction * patients.size)))
    if n_val >= patients.size:
        raise ConfigError(f"val_fraction {val_fraction} leaves no training patient out of "
                          f"{patients.size}; lower it or add patients")
    val_patients = np.random.default_rng(seed).permutation(patients)[:n_val]
    val_cases = cases[np.isin(patient_of[cases], val_patients)]
    is_val = np.isin(store.case_index, val_cases)
    real = store.case_index >= 0
    return np.flatnonzero(~is_val & real), np.flatnonzero(is_val)


def _patient_codes(store: ShardStore, cases: np.ndarray) -> np.ndarray:
    """Integer patient code per case index (each case its own patient when none are recorded)."""
    try:
        names = store.patients()
    except (OSError, ValueError, KeyError):
        names = []
    n = int(cases.max()) + 1 if cases.size else 0
    if len(names) < n:
        return np.arange(max(n, 1))
    _, codes = np.unique(np.asarray(names, dtype=object).astype(str), return_inverse=True)
    return codes.astype(np.int64)


def split_patients(store: ShardStore, train_idx: np.ndarray, val_idx: np.ndarray) -> dict[str, list[str]]:
    """Patient ids on each side of a split (for ``train_config.json``)."""
    names = store.patients()
    side = {}
    for key, idx in (("train", train_idx), ("val", val_idx)):
        cases = np.unique(store.case_index[idx])
        side[key] = sorted({names[int(c)] for c in cases if 0 <= c < len(names)})
    return side


class ShardPool:
    """Streaming weighted sampler over a store's shards (TorchIO-``Queue``-like).

    Parameters
    ----------
    store : ShardStore
        Slice source (streamed or in memory).
    indices : ndarray
        Slices that may be drawn (e.g. the training split).
    weights : ndarray of shape (store.n_slices,), optional
        Sampling weight per store slice (default: the store's ``weights``);
        only ``indices`` count.
    pool_shards : int, optional
        Shards in the pool of one round (default: :data:`DEFAULT_POOL_SLICES` slices' worth);
        memory holds at most two pools.
    draws_per_shard : int, optional
        Draws per pool shard and round (default: the shard length), so a
        round serves ``pool_shards * draws_per_shard`` slices.
    seed : int
        Seed of the pools (the draws within them take the caller's generators).
    prefetch : bool
        Read the next round's shards in a background thread.

    Notes
    -----
    Round ``r`` of epoch ``e`` holds ``pool_shards`` shards drawn i.i.d. (with
    replacement) with probability ``W_s / W``, the training weight in shard
    ``s`` over the total, from ``SeedSequence([seed, e, r, tag])``.  A draw
    picks a pool slot uniformly, then a slice ``i`` of that slot's shard with
    probability ``w_i / W_s``.  Its marginal probability is therefore exactly
    ``w_i / W``, the exact weighted draw, and the expected class shares are
    the store's.  The approximation is in the joint law only: the draws of
    one round come from at most ``pool_shards`` shards (correlated, like any
    queue of patches).  Everything is a function of ``(seed, epoch, round)``
    and the caller's per-batch generator, so batches do not depend on the
    number of loader workers or the order they ask in.
    """

    def __init__(self, store: ShardStore, indices: np.ndarray, weights: np.ndarray | None = None,
                 *, pool_shards: int | None = DEFAULT_POOL_SHARDS, draws_per_shard: int | None = None,
                 seed: int = 0, prefetch: bool = True) -> None:
        if pool_shards is None:
            pool_shards = max(4, -(-DEFAULT_POOL_SLICES // store.shard_len))
        if pool_shards < 1:
            raise ConfigError(f"pool_shards must be >= 1, got {pool_shards}")
        self.store, self.seed, self.prefetch = store, int(seed), bool(prefetch)
        self.pool_shards = int(pool_shards)
        self.draws_per_shard = int(draws_per_shard or store.shard_len)
        w = np.zeros(store.n_slices)
        idx = np.asarray(indices, dtype=np.int64)
        w[idx] = (store.weights if weights is None else np.asarray(weights, np.float64))[idx]
        if not w.sum() > 0:
            raise StoreError("sampling weights of the selected slices sum to 0; rebuild the store "
                             "or sample uniformly")
        self._w = w
        shard_w = np.bincount(np.arange(store.n_slices) // store.shard_len, weights=w,
                              minlength=store.n_shards)
        self._shard_table = AliasTable(shard_w)
        self._state_lock = threading.Lock()
        self._rounds: OrderedDict[tuple[int, int], tuple[np.ndarray, AliasTable]] = OrderedDict()
        self._shards: dict[int, Future] = {}
        self._executor: ThreadPoolExecutor | None = None

    @property
    def round_slices(self) -> int:
        """Draws served by one pool round."""
        return self.pool_shards * self.draws_per_shard

    def round_shards(self, epoch: int, rnd: int) -> np.ndarray:
        """The pool of round ``rnd`` of ``epoch``: ``pool_shards`` shard numbers (seeded)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch), int(rnd), _POOL_TAG]))
        return self._shard_table.sample(rng, self.pool_shards)

    def draw(self, epoch: int, rnd: int, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` store slice indices drawn within the pool of round ``rnd``."""
        pool, table = self._round(epoch, rnd)
        pos = table.sample(rng, size)
        slot, local = pos // self.store.shard_len, pos % self.store.shard_len
        return pool[slot] * self.store.shard_len + local

    def _round(self, epoch: int, rnd: int) -> tuple[np.ndarray, AliasTable]:
        key = (int(epoch), int(rnd))
        with self._state_lock:
            if key in self._rounds:
                return self._rounds[key]
        pool = self.round_shards(epoch, rnd)
        length = self.store.shard_len
        mix = np.zeros(self.pool_shards * length)
        for slot, s in enumerate(pool):  # each slot carries mass 1/P, spread by w_i / W_s
            part = self._w[s * length:(s + 1) * length]
            mix[slot * length:slot * length + part.size] = part / part.sum()
        entry = (pool, AliasTable(mix))
        with self._state_lock:
            self._rounds[key] = entry
            while len(self._rounds) > 4:
                self._rounds.popitem(last=False)
        return entry

    def fetch(self, epoch: int, rnd: int, indices: np.ndarray,
              next_round: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Images (float32) and labels (uint8) of ``indices`` drawn from round ``rnd``.

        Loads the round's shards (waiting for those being prefetched), starts
        reading ``next_round``'s in the background and forgets shards that
        belong to neither, so at most two pools are held.
        """
        pool, _ = self._round(epoch, rnd)
        keep = set(pool.tolist())
        ahead: list[int] = []
        if next_round is not None and self.prefetch:
            ahead = self._round(*next_round)[0].tolist()
        with self._state_lock:
            for s in keep:
                self._load(s, background=False)
            for s in ahead:
                self._load(s, background=True)
            for s in [s for s in self._shards if s not in keep and s not in ahead]:
                del self._shards[s]
            futures = {s: self._shards[s] for s in keep}
        idx = np.asarray(indices, dtype=np.int64)
        shape = self.store.slice_shape
        images = np.empty((idx.size, *shape), dtype=np.float32)
        labels = np.empty((idx.size, *shape), dtype=np.uint8)
        shard_of = idx // self.store.shard_len
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            img, lab = futures[int(s)].result()
            local = idx[sel] - s * self.store.shard_len
            images[sel], labels[sel] = img[local], lab[local]
        return images, labels

    def resident_shards(self) -> int:
        """Shards held (loaded or loading) now."""
        with self._state_lock:
            return len(self._shards)

    def _load(self, shard: int, *, background: bool) -> None:
        """Make sure ``shard`` is loaded or loading (call with the state lock held)."""
        if shard in self._shards:
            return
        if background:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmrprep-pool")
            self._shards[shard] = self._executor.submit(self.store.read_shard, shard)
            return
        fut: Future = Future()
        self._shards[shard] = fut
        try:
            fut.set_result(self.store.read_shard(shard))
        except BaseException as exc:  # noqa: BLE001 - re-raised to every waiter by result()
            fut.set_exception(exc)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_state_lock", "_executor"):
            state.pop(name)
        state["_shards"], state["_rounds"] = {}, OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._state_lock = threading.Lock()
        self._executor = None


def class_weight_table(spec: Any, store: "ShardStore") -> np.ndarray | None:
    """Class weights as a float32 lookup table by label (``None``: no sample weights).

    ``spec``: ``None``, ``"store"`` (the store's ``class_weights`` attribute, the
    weight scheme it was built with) or one non-negative weight per class.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "store":
            raise ConfigError(f"class_weights must be 'store', None or a sequence, got {spec!r}")
        spec = store.attrs.get("class_weights")
        if not spec:
            raise ConfigError(f"store {store.path} has no class_weights attribute; rebuild it or "
                              "pass class_weights explicitly")
    table = np.asarray(spec, dtype=np.float32).ravel()
    c = store.num_classes
    if table.size != c or not np.all(np.isfinite(table)) or (table < 0).any():
        raise ConfigError(f"class_weights must be {c} finite non-negative values (one per class of "
                          f"{list(store.classes)}), got {list(spec)}")
    return table
