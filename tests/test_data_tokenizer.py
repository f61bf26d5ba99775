import pickle

import numpy as np
import pytest

from eqx_pi05.data.make_demo_dataset import EXTRA_TEXT, LIBERO_SPATIAL_TASKS
from eqx_pi05.data.tokenizer import Tokenizer, clean_prompt, discretize_state, train_sentencepiece


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_sentencepiece([*LIBERO_SPATIAL_TASKS, EXTRA_TEXT], tmp_path_factory.mktemp("tok") / "tokenizer.model")


def test_special_ids_follow_paligemma(model_path):
    sp = Tokenizer(model_path, 48)._sp
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "</s>", "<s>", "<unk>"]
    assert sp.bos_id() == 2 and sp.pad_id() == 0


def test_prompt_is_bos_text_newline_right_padded_with_zeros(model_path):
    tok = Tokenizer(model_path, 48)
    ids, mask = tok.tokenize("pick up the black bowl")
    expected = [2, *tok.encode("pick up the black bowl"), *tok.encode("\n")]
    assert len(tok.encode("\n")) == 1
    assert ids.dtype == np.int32 and mask.dtype == np.bool_
    np.testing.assert_array_equal(ids[: len(expected)], expected)
    assert not ids[len(expected):].any()
    np.testing.assert_array_equal(mask, np.arange(48) < len(expected))


def test_prompt_is_cleaned_before_tokenizing(model_path):
    tok = Tokenizer(model_path, 48)
    assert clean_prompt("  pick_up the\nbowl ") == "pick up the bowl"
    np.testing.assert_array_equal(tok.tokenize("  pick_up the\nbowl ")[0], tok.tokenize("pick up the bowl")[0])


def test_state_is_binned_into_256_bins_over_minus_one_to_one():
    state = np.array([-1.5, -1.0, -0.995, -0.99, 0.0, 0.5, 0.9921875, 0.999, 1.5])  # bins 2/256 wide
    np.testing.assert_array_equal(discretize_state(state), [-1, 0, 0, 1, 128, 192, 255, 255, 255])


def test_discrete_state_prompt_format(model_path):
    tok = Tokenizer(model_path, 64)
    ids, mask = tok.tokenize("put_it down", state=np.array([-1.0, 0.0, 0.999]))
    expected = tok.encode("Task: put it down, State: 0 128 255;\nAction: ", add_bos=True)
    np.testing.assert_array_equal(ids[: len(expected)], expected)
    assert mask.sum() == len(expected)


def test_long_prompt_is_truncated_with_a_warning(model_path):
    tok = Tokenizer(model_path, 5)
    full = [2, *tok.encode(LIBERO_SPATIAL_TASKS[4]), *tok.encode("\n")]
    with pytest.warns(UserWarning, match=r"more than max_token_len=5: truncated"):
        ids, mask = tok.tokenize(LIBERO_SPATIAL_TASKS[4])
    np.testing.assert_array_equal(ids, full[:5])
    assert mask.all()


def test_demo_tokenizer_fits_every_task_in_48_tokens(model_path):
    tok = Tokenizer(model_path, 48)
    for task in LIBERO_SPATIAL_TASKS:
        assert tok.tokenize(task)[1].sum() <= 24, task  # whole words: ~one token per word


def test_tokenizer_survives_pickling_for_worker_processes(model_path):
    tok = Tokenizer(model_path, 48)
    clone = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(clone.tokenize("pick up the plate")[0], tok.tokenize("pick up the plate")[0])


def test_missing_or_invalid_model_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SentencePiece model at"):
        Tokenizer(tmp_path / "absent.model", 48)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        Tokenizer(bad, 48)
