import pytest

import fastkern


def test_warmup_returns_seconds():
    seconds = fastkern.warmup(dtypes=("float32",))
    assert isinstance(seconds, float) and seconds > 0


def test_warmup_rejects_bad_dtype():
    with pytest.raises(ValueError, match="int32"):
        fastkern.warmup(dtypes=("int32",))
