"""Pack/unpack: property tests against an independent numpy bitstream packer."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxq.core import packing


@st.composite
def codes(draw):
    bits = draw(st.sampled_from(packing.SUPPORTED_BITS))
    rows = draw(st.integers(1, 3))
    # A fixed menu of widths (odd, word-aligned and not) keeps jit recompiles bounded.
    n = draw(st.sampled_from([1, 3, 7, 31, 32, 33, 64, 96, 100, 129, 200]))
    seed = draw(st.integers(0, 2**31 - 1))
    q = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, n), dtype=np.uint32)
    return bits, q


@settings(max_examples=60, deadline=None)
@given(codes())
def test_pack_matches_numpy_reference_and_round_trips(case):
    bits, q = case
    packed = np.asarray(packing.pack(jnp.asarray(q), bits))
    assert packed.dtype == np.uint32
    assert packed.shape == (q.shape[0], packing.packed_width(q.shape[1], bits))
    np.testing.assert_array_equal(packed, packing.pack_numpy(q, bits))
    unpacked = packing.unpack(jnp.asarray(packed), bits, q.shape[1])
    np.testing.assert_array_equal(np.asarray(unpacked), q)


@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
def test_lsb_first_bit_positions(bits):
    # Code i of value 1 sets exactly stream bit i*bits.
    n = 64
    for i in (0, 1, n // 2, n - 1):
        q = np.zeros((1, n), np.uint32)
        q[0, i] = 1
        words = packing.pack_numpy(q, bits)[0]
        bit = i * bits
        expected = np.zeros_like(words)
        expected[bit // 32] = np.uint32(1) << np.uint32(bit % 32)
        np.testing.assert_array_equal(words, expected)
        np.testing.assert_array_equal(np.asarray(packing.pack(jnp.asarray(q), bits))[0], expected)


@pytest.mark.parametrize("bits", [0, 9, 16])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="unsupported bit width"):
        packing.pack(jnp.zeros((1, 32), jnp.uint32), bits)


def test_unpack_rejects_wrong_width():
    with pytest.raises(ValueError, match="cannot hold"):
        packing.unpack(jnp.zeros((1, 3), jnp.uint32), 4, 32)


@pytest.mark.parametrize("bits", [3, 4])
def test_out_of_range_codes_never_corrupt_neighbours(bits):
    """Host codes out of range are refused; device codes are masked, so the neighbour of a bad
    code unpacks unchanged."""
    with pytest.raises(ValueError, match=rf"\[0, {1 << bits}\) for {bits}-bit"):
        packing.pack(np.array([[1 << bits, 1]]), bits)
    with pytest.raises(ValueError, match="codes must lie"):
        packing.pack(np.array([[-1, 1]]), bits)
    back = packing.unpack(packing.pack(jnp.array([[(1 << bits) + 2, 1, 5]]), bits), bits, 3)
    np.testing.assert_array_equal(np.asarray(back), [[2, 1, 5]])
