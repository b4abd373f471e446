"""toy_data: the examples in its docstring hold (verse-lookup records whose answer is quoted from their context)."""
from __future__ import annotations


def test_toy_data_doctests():
    import doctest

    from longalign_lib import toy_data

    result = doctest.testmod(toy_data)
    assert result.attempted >= 2 and result.failed == 0
