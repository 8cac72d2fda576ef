"""Group ids against the pure-Python SplitMix64 specification; P^T P = I."""

import pytest
import torch

from gpart_ds.methods.gpart import partition
from gpart_ds.methods.gpart.kernels import get_kernels

# (seed, start): ordinary values, and values where seed + k + gamma wraps around 2^64
# or sits next to 2^63 (where int64 emulation changes sign).
CASES = [
    (0, 0),
    (42, 12345),
    (2**63 - 7, 0),
    (0, 2**63 - 3),
    (2**64 - 1, 5),
    (2**63 - 0x9E3779B97F4A7C15 - 2, 0),
    (123456789, 2**62 + 17),
]
DS = [1, 2, 3, 7, 1000, 131072, 524288, 1000003, 2**31 + 11]


def test_reference_hash_matches_published_splitmix64_vectors():
    # The SplitMix64 generator seeded with 0 outputs mix(gamma), then mix(2 * gamma): the
    # published first two outputs. Here state = seed + k + gamma, so they are k = 0 with
    # seed 0 and seed gamma.
    assert partition.splitmix64_reference(0, 0) == 0xE220A8397B1DCDAF
    assert partition.splitmix64_reference(0x9E3779B97F4A7C15, 0) == 0x6E789E6AA1B965F4


@pytest.mark.parametrize("seed,start", CASES)
@pytest.mark.parametrize("d", DS)
def test_group_ids_match_python_reference(seed, start, d):
    n = 257
    got = partition.group_ids(start, n, d, seed).tolist()
    want = [partition.group_id_reference(seed, start + i, d) for i in range(n)]
    assert got == want


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_kernel_ids_match_reference_near_2_63(mode):
    k = get_kernels(mode)
    seed, start, d, n = 2**63 - 5, 2**63 - 100, 524288, 300
    base = torch.tensor(partition.hash_base(seed, start))
    counts = k.count_groups(base, n, d)
    want = torch.zeros(d, dtype=torch.int64)
    for i in range(n):
        want[partition.group_id_reference(seed, start + i, d)] += 1
    assert torch.equal(counts, want)


@pytest.mark.parametrize("chunks", [[1000], [1, 999], [333, 333, 334], [7] * 142 + [6]])
def test_group_ids_independent_of_chunking(chunks):
    seed, start, d = 2024, 10**9, 4099
    whole = partition.group_ids(start, sum(chunks), d, seed)
    parts, at = [], start
    for c in chunks:
        parts.append(partition.group_ids(at, c, d, seed))
        at += c
    assert torch.equal(torch.cat(parts), whole)


def test_group_counts_independent_of_chunk_size_and_counter():
    seed, d, D = 7, 97, 50_000
    want = torch.bincount(partition.group_ids(0, D, d, seed), minlength=d)
    assert torch.equal(partition.group_counts(0, D, d, seed, chunk=4096), want)
    compiled = get_kernels("compiled").count_groups
    assert torch.equal(partition.group_counts(0, D, d, seed, chunk=10_001, counter=compiled), want)


def test_group_ids_bad_arguments_raise():
    with pytest.raises(ValueError, match="d must be >= 1"):
        partition.group_ids(0, 10, 0, 1)
    with pytest.raises(ValueError, match="start and numel"):
        partition.group_ids(-1, 10, 3, 1)


@pytest.mark.parametrize("D,d,seed", [(60, 7, 0), (300, 40, 3), (1000, 1000, 9), (97, 1, 2**63 + 1)])
def test_projection_is_isometric(D, d, seed):
    P = partition.dense_projection(D, d, seed)
    counts = torch.bincount(partition.group_ids(0, D, d, seed), minlength=d)
    eye = torch.eye(d, dtype=torch.float64)
    # Empty groups have a zero column (and scale 1): P^T P = I on the non-empty groups.
    eye[counts == 0, counts == 0] = 0
    torch.testing.assert_close(P.T @ P, eye, rtol=0, atol=1e-6)
    theta = torch.randn(d, dtype=torch.float64)
    theta[counts == 0] = 0
    torch.testing.assert_close((P @ theta).norm(), theta.norm())


def test_scales_round_like_float32_division_of_sqrt():
    counts = torch.tensor([0, 1, 2, 3, 1000, 123457])
    s = partition.scales_from_counts(counts)
    assert s.dtype == torch.float32
    want = [(1.0 / torch.sqrt(torch.tensor(float(max(c, 1)), dtype=torch.float32))).item() for c in counts.tolist()]
    # ...which is not the same as rsqrt or a float64 computation rounded afterwards.
    assert want[-1] != 1.0 / (123457**0.5)
    assert s.tolist() == want
