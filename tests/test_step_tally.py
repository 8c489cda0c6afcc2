"""serving.step_tally (host only) and the rows `bench throughput` builds from it, on hand-made
timelines: which seconds each step is charged, the per-shape sums and the decode batch bins."""

import pytest

from serving.bench.step_breakdown import decode_batch_histogram, format_step_breakdown, step_breakdown
from serving.step_tally import StepTally

GENERAL = (64, 8, 4, False, False)
DECODE = (8, 8, 4, True, True)


def test_synchronous_calls_charge_each_step_its_own_call_up_to_its_record():
    tally = StepTally()
    tally.begin_call(0.0)
    assert tally.record(GENERAL, 40, 3, 3.0) == pytest.approx(3.0)
    tally.end_call(4.0, in_flight=False)       # after the record, nothing in flight: not charged
    tally.begin_call(10.0)                     # idle 4 .. 10: not charged
    assert tally.record(DECODE, 5, 5, 12.0) == pytest.approx(2.0)
    tally.end_call(12.5, in_flight=False)
    assert tally.by_shape[GENERAL].seconds == pytest.approx(3.0)
    assert tally.by_shape[DECODE].seconds == pytest.approx(2.0)


def test_async_calls_charge_the_time_between_records_inside_calls():
    """One step stays in flight: a step's charge runs from the previous record (or the start of the
    call that dispatched it) to its own record, leaving out the caller's time between calls."""
    tally = StepTally()
    tally.begin_call(0.0)                      # dispatches step 1 only
    tally.end_call(1.0, in_flight=True)
    tally.begin_call(1.5)                      # dispatches 2, collects 1
    assert tally.record(GENERAL, 40, 3, 3.0) == pytest.approx(1.0 + 1.5)
    tally.end_call(4.0, in_flight=True)
    tally.begin_call(4.5)                      # dispatches nothing, collects 2
    assert tally.record(DECODE, 3, 3, 6.0) == pytest.approx(1.0 + 1.5)
    tally.end_call(7.0, in_flight=False)
    tally.begin_call(100.0)                    # a later run: the idle time is nobody's
    tally.end_call(100.5, in_flight=True)
    tally.begin_call(101.0)
    assert tally.record(DECODE, 2, 2, 102.0) == pytest.approx(0.5 + 1.0)
    assert tally.by_shape[DECODE].steps == 2 and tally.by_shape[DECODE].seconds == pytest.approx(4.0)
    assert tally.by_shape[DECODE].real_tokens == 5 and tally.by_shape[DECODE].real_seqs == 5


def test_decode_batches_count_one_token_per_sequence_steps_only():
    tally = StepTally()
    for shape, tokens, seqs in [(GENERAL, 40, 3), (GENERAL, 3, 3), (DECODE, 3, 3), (DECODE, 8, 8)]:
        tally.begin_call(0.0)
        tally.record(shape, tokens, seqs, 1.0)
    assert sorted(tally.decode_batches) == [3, 8]
    assert tally.decode_batches[3].steps == 2 and tally.decode_batches[3].seconds == pytest.approx(2.0)
    assert tally.decode_batches[8].steps == 1


def test_since_subtracts_an_earlier_copy_and_drops_shapes_without_new_steps():
    tally = StepTally()
    tally.begin_call(0.0)
    tally.record(GENERAL, 40, 3, 1.0)
    before = tally.copy()
    tally.begin_call(5.0)
    tally.record(DECODE, 4, 4, 7.0)
    tally.begin_call(8.0)
    tally.record(DECODE, 2, 2, 8.5)
    delta = tally.since(before)
    assert list(delta.by_shape) == [DECODE]
    assert delta.by_shape[DECODE].steps == 2 and delta.by_shape[DECODE].seconds == pytest.approx(2.5)
    assert sorted(delta.decode_batches) == [2, 4]
    assert before.by_shape[GENERAL].steps == 1 and DECODE not in before.by_shape   # the copy is its own


def test_rows_sorted_by_seconds_with_shares_of_the_elapsed_time():
    tally = StepTally()
    for shape, tokens, seqs, seconds in [(GENERAL, 40, 3, 1.0), (DECODE, 8, 8, 2.0), (DECODE, 7, 7, 2.0)]:
        tally.begin_call(0.0)
        tally.record(shape, tokens, seqs, seconds)
    res = {"elapsed_time": 10.0, **step_breakdown(tally, 10.0)}
    first, second = res["steps_by_bucket"]
    assert (first["tokens"], first["seqs"], first["pages"], first["decode_only"], first["plain"]) == DECODE
    assert (first["steps"], first["real_tokens"], first["real_seqs"]) == (2, 15, 15)
    assert first["seconds"] == pytest.approx(4.0) and first["mean_step_ms"] == pytest.approx(2000.0)
    assert first["share_of_time"] == pytest.approx(0.4) and second["share_of_time"] == pytest.approx(0.1)
    assert res["step_wall_seconds"] == pytest.approx(5.0)
    text = format_step_breakdown(res)
    assert "5.00 s, 50.0% of 10.00 s elapsed" in text
    assert text.index("decode plain") < text.index("general")


def test_decode_batch_bins_double_from_8_up_to_the_largest_batch():
    tally = StepTally()
    for seqs, seconds in [(1, 1.0), (2, 1.0), (8, 1.0), (9, 2.0), (130, 4.0)]:
        tally.begin_call(0.0)
        tally.record(DECODE, seqs, seqs, seconds)
    rows = decode_batch_histogram(tally, elapsed=10.0)
    assert [r["seqs"] for r in rows] == ["1", "2-8", "9-16", "17-32", "33-64", "65-128", "129-256"]
    by = {r["seqs"]: r for r in rows}
    assert by["2-8"]["steps"] == 2 and by["2-8"]["mean_seqs"] == pytest.approx(5.0)
    assert by["2-8"]["seconds"] == pytest.approx(2.0) and by["2-8"]["mean_step_ms"] == pytest.approx(1000.0)
    assert by["17-32"]["steps"] == 0 and by["17-32"]["mean_step_ms"] == 0.0
    assert by["129-256"]["share_of_time"] == pytest.approx(0.4)
    assert decode_batch_histogram(StepTally(), elapsed=1.0) == []


def test_collect_waits_sum_per_shape_and_survive_since_and_the_rows():
    tally = StepTally()
    tally.begin_call(0.0)
    tally.record(DECODE, 8, 8, 2.0, wait=1.5)          # device-bound: most of its 2 s in collect
    before = tally.copy()
    tally.begin_call(2.0)
    tally.record(DECODE, 8, 8, 4.0, wait=0.25)         # host-bound: the device was done
    tally.begin_call(4.0)
    tally.record(GENERAL, 40, 3, 5.0)                  # no wait given: 0
    assert tally.by_shape[DECODE].wait_seconds == pytest.approx(1.75)
    assert tally.decode_batches[8].wait_seconds == pytest.approx(1.75)
    delta = tally.since(before)
    assert delta.by_shape[DECODE].wait_seconds == pytest.approx(0.25)
    res = {"elapsed_time": 5.0, **step_breakdown(tally, 5.0)}
    rows = {r["kind"]: r for r in res["steps_by_bucket"]}
    assert rows["decode plain"]["mean_wait_ms"] == pytest.approx(875.0) and rows["general"]["mean_wait_ms"] == 0.0
    (bin8,) = [r for r in res["decode_batch_sizes"] if r["seqs"] == "2-8"]
    assert bin8["mean_wait_ms"] == pytest.approx(875.0)
    assert "wait ms" in format_step_breakdown(res)
