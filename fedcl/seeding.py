"""Seeds derived from (seed, purpose, client, round, task), never from global RNG state or
scheduling order."""

from __future__ import annotations

import zlib

import numpy as np


def _key_to_int(key: int | str) -> int:
    # Python's hash() of a str is salted per process; crc32 is stable across processes and machines.
    return zlib.crc32(key.encode()) if isinstance(key, str) else int(key)


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 32-bit seed that depends only on `seed` and `keys` (e.g. "train", client, round, task)."""
    sequence = np.random.SeedSequence([int(seed), *(_key_to_int(k) for k in keys)])
    return int(sequence.generate_state(1)[0])


def derive_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """Return a numpy Generator seeded by `derive_seed(seed, *keys)`."""
    return np.random.default_rng(derive_seed(seed, *keys))
