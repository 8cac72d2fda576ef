"""Stateless GPart partition: group ids, group sizes and isometric scales.

Pure PyTorch. Nothing here knows about DeepSpeed, models or files: a global weight
index k (a position in the canonical flattening of all target weights) maps to a group
g(k) = SplitMix64(seed + k) mod d. Any process can regenerate the ids of any slice from
(seed, start, numel), so ids are never stored.

PyTorch has no uint64 arithmetic on every device, so SplitMix64 is emulated on int64:
two's complement + and * wrap exactly like uint64; right shifts are made logical by
masking; the final unsigned reduction corrects the sign (see `_unsigned_mod`).
"""

from __future__ import annotations

import torch

HASH_NAME = "splitmix64"
HASH_VERSION = 1

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB

# Chunk for the eager paths: bounds int64 temporaries to a few tens of MB.
DEFAULT_CHUNK = 1 << 22


def to_int64(value: int) -> int:
    """Reinterpret an unsigned 64-bit value (taken mod 2^64) as a signed int64."""
    value &= _MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


_MUL1_S = to_int64(_MUL1)
_MUL2_S = to_int64(_MUL2)


def splitmix64_reference(seed: int, k: int) -> int:
    """The hash on Python ints: the specification every tensor path is tested against."""
    z = (seed + k + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    return z ^ (z >> 31)


def group_id_reference(seed: int, k: int, d: int) -> int:
    return splitmix64_reference(seed, k) % d


def hash_base(seed: int, start: int) -> int:
    """seed + start + golden gamma as int64: the only per-slice constant of the hash."""
    return to_int64(seed + start + _GOLDEN)


def _logical_shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping arithmetic)."""
    z = (z ^ _logical_shift_right(z, 30)) * _MUL1_S
    z = (z ^ _logical_shift_right(z, 27)) * _MUL2_S
    return z ^ _logical_shift_right(z, 31)


def _unsigned_mod(z: torch.Tensor, d: int) -> torch.Tensor:
    # A negative int64 z stands for z + 2^64: add (2^64 mod d) back before reducing.
    r = torch.remainder(z, d)
    # 2^64 mod d, with every intermediate below 2^63 so that it also works when d is a
    # symbolic int inside torch.compile(dynamic=True).
    wrap = ((((2**63 - 1) % d + 1) % d) * 2) % d
    if wrap == 0:
        return r
    return torch.remainder(r + (z < 0).to(torch.int64) * wrap, d)


def ids_from_positions(base: torch.Tensor | int, positions: torch.Tensor, d: int) -> torch.Tensor:
    """Group ids of positions relative to a slice whose `hash_base` is `base`.

    Written as one expression of elementwise ops so that torch.compile fuses it (no
    int64 temporaries in memory); see kernels.py.
    """
    return _unsigned_mod(mix(positions + base), d)


def group_ids(start: int, numel: int, d: int, seed: int, device=None) -> torch.LongTensor:
    """Group ids g(k) for k in [start, start + numel).

    Identical whatever the chunking: g is a pure function of (seed, k, d).
    """
    _check_args(start, numel, d)
    pos = torch.arange(numel, dtype=torch.int64, device=device)
    return ids_from_positions(hash_base(seed, start), pos, d)


def group_counts(
    start: int, numel: int, d: int, seed: int, device=None, chunk: int = DEFAULT_CHUNK, counter=None
) -> torch.LongTensor:
    """n_j restricted to positions [start, start + numel), counted in bounded chunks.

    `counter(base_tensor, n, d)` may replace the eager chunk counter (a compiled kernel).
    """
    _check_args(start, numel, d)
    counts = torch.zeros(d, dtype=torch.int64, device=device)
    for c0 in range(0, numel, chunk):
        n = min(chunk, numel - c0)
        if counter is not None:
            counts += counter(torch.tensor(hash_base(seed, start + c0), device=device), n, d)
        else:
            counts += torch.bincount(group_ids(start + c0, n, d, seed, device), minlength=d)
    return counts


def scales_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """s_j = 1 / sqrt(max(n_j, 1)) in float32.

    Computed as a true division of a float32 sqrt (not rsqrt) so it rounds exactly like
    the reference implementation: adapters trained there merge bit-identically here.
    """
    return 1.0 / torch.sqrt(counts.clamp(min=1).to(torch.float32))


# Up to this many weights the dry run counts n_j exactly (~1.5 s on 2 CPU cores, eager).
EXACT_STATS_LIMIT = 1 << 23


def group_size_stats(D: int, d: int, seed: int = 0, exact_limit: int = EXACT_STATS_LIMIT) -> dict:
    """Mean / sd / min / max of the group sizes n_j and the number of empty groups.

    Exact (counted) when D <= exact_limit. Otherwise from theory: g is a uniform hash, so
    (n_1, ..., n_d) is Multinomial(D; 1/d, ..., 1/d) and each n_j is Binomial(D, 1/d) with
    mean D/d and sd sqrt(D/d (1 - 1/d)); the expected extremes over d groups are taken from
    the normal extreme-value approximation mean -/+ sd * a_d with
    a_d = sqrt(2 ln d) - (ln ln d + ln 4 pi) / (2 sqrt(2 ln d)), and the expected number of
    empty groups is d (1 - 1/d)^D. `method` says which was used.
    """
    import math

    _check_args(0, D, d)
    if D <= exact_limit:
        n = group_counts(0, D, d, seed).to(torch.float64)
        return {
            "method": "exact",
            "mean": D / d,
            "sd": float(n.std(unbiased=False)),
            "min": int(n.min()),
            "max": int(n.max()),
            "empty": int((n == 0).sum()),
        }
    mean = D / d
    sd = math.sqrt(mean * (1 - 1 / d))
    if d > 2:
        two_ln = math.sqrt(2 * math.log(d))
        a_d = two_ln - (math.log(math.log(d)) + math.log(4 * math.pi)) / (2 * two_ln)
    else:
        a_d = 0.5642  # E[max] of two standard normals = 1/sqrt(pi)
    # d (1 - 1/d)^D through logs: the power underflows long before it matters.
    empty = d * math.exp(D * math.log1p(-1 / d)) if d > 1 else 0.0
    return {
        "method": "theory",
        "mean": mean,
        "sd": sd,
        "min": max(0.0, mean - sd * a_d),
        "max": mean + sd * a_d,
        "empty": empty,
    }


def dense_projection(D: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """The D x d matrix P, built densely. For tests and tiny cases only."""
    ids = group_ids(0, D, d, seed)
    scales = scales_from_counts(torch.bincount(ids, minlength=d)).to(dtype)
    P = torch.zeros(D, d, dtype=dtype)
    P[torch.arange(D), ids] = scales[ids]
    return P


def _check_args(start: int, numel: int, d: int) -> None:
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    if start < 0 or numel < 0:
        raise ValueError(f"start and numel must be >= 0, got start={start}, numel={numel}")
