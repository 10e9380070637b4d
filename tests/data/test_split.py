"""The held-out split on small sets: a share too small or too large holds out nothing and says so; a count as
large as the data is an error naming both numbers."""

from __future__ import annotations

import logging

import pytest

from lowtune.data.split import held_out_count
from lowtune.errors import UserError


@pytest.mark.parametrize(("total", "val_size", "held"), [(100, 0.05, 5), (100, 0, 0), (5, 2, 2), (3, 0.5, 2)])
def test_shares_and_counts(total, val_size, held):
    assert held_out_count(total, val_size) == held


@pytest.mark.parametrize(("total", "val_size"), [(1, 0.05), (9, 0.05), (2, 0.9)])
def test_a_share_that_rounds_to_none_or_to_all_holds_out_nothing_and_says_so(total, val_size, caplog):
    caplog.set_level(logging.WARNING, logger="lowtune.data.split")
    assert held_out_count(total, val_size) == 0
    assert f"data.val_size={val_size:g} of {total} records" in caplog.text and "holding out nothing" in caplog.text


@pytest.mark.parametrize(("total", "count"), [(1, 1), (5, 5), (5, 9)])
def test_a_count_as_large_as_the_data_names_both_numbers(total, count):
    with pytest.raises(UserError) as caught:
        held_out_count(total, count)
    (problem,) = caught.value.problems
    assert f"data.val_size={count} holds out {count} records, and the data has {total}" in problem.message
    assert problem.fix and (f"below {total}" in problem.fix if total > 1 else "data.val_size: 0" in problem.fix)
