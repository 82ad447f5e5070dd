import numba
import pytest

import fastkern


def test_set_and_get_num_threads_round_trip():
    before = fastkern.get_num_threads()
    fastkern.set_num_threads(1)
    assert fastkern.get_num_threads() == 1 == numba.get_num_threads()
    fastkern.set_num_threads(before)
    assert fastkern.get_num_threads() == before


def test_threads_context_manager_restores_count_after_an_error():
    before = fastkern.get_num_threads()
    with pytest.raises(RuntimeError):
        with fastkern.threads(1):
            assert fastkern.get_num_threads() == 1
            raise RuntimeError("boom")
    assert fastkern.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 10_000])
def test_out_of_range_thread_counts_raise_value_error(bad):
    with pytest.raises(ValueError, match="threads"):
        fastkern.set_num_threads(bad)


@pytest.mark.parametrize("bad", [1.5, "2", True, None])
def test_non_integer_thread_counts_raise_type_error(bad):
    with pytest.raises(TypeError):
        fastkern.set_num_threads(bad)
