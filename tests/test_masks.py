import chex
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_pi05.masks import make_attn_mask, make_positions


def test_prefix_lm_blocks_prefix_never_sees_suffix():
    # 3 prefix tokens (ar False), 3 suffix tokens (first ar True).
    input_mask = jnp.ones((1, 6), bool)
    ar = jnp.array([False, False, False, True, False, False])
    m = np.asarray(make_attn_mask(input_mask, ar))[0]
    expected = np.array(
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(m, expected)


def test_causal_when_every_token_starts_a_block():
    m = np.asarray(make_attn_mask(jnp.ones((1, 4), bool), jnp.ones(4, bool)))[0]
    np.testing.assert_array_equal(m, np.tril(np.ones((4, 4), bool)))


def test_invalid_token_neither_attends_nor_is_attended():
    input_mask = jnp.array([[True, False, True, True], [True, True, True, False]])
    ar = jnp.array([False, False, True, False])
    m = np.asarray(make_attn_mask(input_mask, ar))
    assert not m[0, 1].any() and not m[0, :, 1].any()
    assert not m[1, 3].any() and not m[1, :, 3].any()
    # valid pairs keep the prefix-LM rule
    assert m[0, 0, 0] and m[0, 2, 0] and not m[0, 0, 2] and m[0, 3, 2]


def test_mask_rejects_mismatched_lengths():
    with pytest.raises(Exception):
        make_attn_mask(jnp.ones((1, 4), bool), jnp.ones(5, bool))


def test_positions_skip_invalid_tokens():
    input_mask = jnp.array([[False, True, True, False, True], [True, True, True, True, True]])
    pos = make_positions(input_mask)
    chex.assert_trees_all_equal(pos, jnp.array([[-1, 0, 1, 1, 2], [0, 1, 2, 3, 4]], jnp.int32))
    chex.assert_trees_all_equal(
        make_positions(jnp.ones((2, 2), bool), offset=jnp.array([3, 5])), jnp.array([[3, 4], [5, 6]])
    )


def test_positions_of_valid_tokens_do_not_depend_on_removed_tokens():
    full = jnp.array([[True, False, False, True, True]])
    dropped = jnp.array([[True, True, True]])
    np.testing.assert_array_equal(np.asarray(make_positions(full))[0][[0, 3, 4]], np.asarray(make_positions(dropped))[0])


def test_mask_matches_golden_fixture(golden):
    _, cases, _ = golden
    from eqx_pi05.parity import compute_case

    model, _, _ = golden
    for case in ("case_i", "case_ii", "case_iii"):
        ours = compute_case(model, cases, case)
        np.testing.assert_array_equal(ours["positions"], cases[f"{case}/positions"])
        np.testing.assert_array_equal(ours["prefix_mask"], cases[f"{case}/prefix_mask"])
