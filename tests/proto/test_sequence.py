from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llm_ops_helper.proto.sequence import SeqTracker, Verdict


def test_in_order_seqs_are_fresh_and_redeliveries_are_duplicates() -> None:
    tracker = SeqTracker()
    assert [tracker.observe("h", "r1", s) for s in (1, 2, 3)] == [Verdict.FRESH] * 3
    assert tracker.observe("h", "r1", 3) is Verdict.DUPLICATE
    assert tracker.observe("h", "r1", 2) is Verdict.DUPLICATE
    assert (tracker.duplicates, tracker.missing("h")) == (2, 0)


def test_gaps_are_counted_and_late_arrivals_fill_them() -> None:
    tracker = SeqTracker()
    tracker.observe("h", "r1", 1)
    tracker.observe("h", "r1", 5)
    assert tracker.missing("h") == 3
    assert tracker.observe("h", "r1", 3) is Verdict.LATE
    assert tracker.observe("h", "r1", 3) is Verdict.DUPLICATE
    assert tracker.missing("h") == 2


def test_a_new_run_starts_over_and_hosts_are_independent() -> None:
    tracker = SeqTracker()
    tracker.observe("a", "r1", 10)
    assert tracker.observe("a", "r2", 1) is Verdict.FRESH
    assert tracker.observe("b", "r9", 1) is Verdict.FRESH
    assert tracker.restarts == 1
    assert tracker.missing("a") == 0


def test_the_window_bounds_memory_after_a_huge_jump() -> None:
    tracker = SeqTracker(window=100)
    tracker.observe("h", "r", 1)
    tracker.observe("h", "r", 10_000_000)
    assert tracker.missing("h") == 100


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=60), max_size=200))
def test_each_seq_is_accepted_exactly_once_whatever_the_order(seqs: list[int]) -> None:
    tracker = SeqTracker()
    accepted = [s for s in seqs if tracker.observe("h", "r", s) is not Verdict.DUPLICATE]
    assert sorted(accepted) == sorted(set(seqs))
    assert tracker.missing("h") == (max(seqs) - len(set(seqs)) if seqs else 0)
