"""The anomaly detector: bank and single-series detector agree, score before learn, decisions."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_ops_helper.controller.analytics.bank import BankFileError, DetectorBank
from llm_ops_helper.controller.analytics.detector import DetectorParams
from llm_ops_helper.controller.analytics.online import OnlineDetector


def feed(bank: DetectorBank, key: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    slot = bank.slot(key)
    scores, fired = [], []
    for v in values:
        r = bank.update(np.array([slot]), np.array([v]))
        scores.append(r.score[0])
        fired.append(r.is_anomaly[0])
    return np.array(scores), np.array(fired)


def noisy(n: int, seed: int = 0) -> np.ndarray:
    return 50.0 + np.random.default_rng(seed).normal(size=n)


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(finite, st.just(float("nan"))), min_size=1, max_size=300))
def test_bank_and_online_detector_agree(values: list[float]) -> None:
    bank = DetectorBank()
    bank_scores, bank_fired = feed(bank, "s", np.array(values))
    online = OnlineDetector()
    for v, expected, fired in zip(values, bank_scores, bank_fired, strict=True):
        assert online.score_one({"value": v}) == expected
        online.learn_one({"value": v})
        if v == v:
            assert online.last_is_anomaly == fired
        assert 0.0 <= expected <= 1.0


def test_first_sample_scores_zero_and_a_spike_scores_before_it_is_learned() -> None:
    d = OnlineDetector()
    assert d.score_one({"value": 123.0}) == 0.0
    for v in noisy(500):
        d.learn_one({"value": v})
    spike = d.score_one({"value": 80.0})
    assert spike > 0.9
    assert d.score_one({"value": 80.0}) == spike  # scoring does not learn
    d.learn_one({"value": 80.0})
    assert d.last_is_anomaly
    d.learn_one({"value": 50.0})  # the return is surprising too, but the alert was raised
    assert not d.last_is_anomaly


def test_constant_series_never_fires_then_a_step_fires_once() -> None:
    values = np.r_[np.full(2000, 64.0), np.full(100, 91.0)]
    bank = DetectorBank()
    scores, fired = feed(bank, "gpu0/temperature", values)
    assert not fired[:2000].any()
    assert scores[:2000].max() < 0.05
    assert fired[2000]
    assert fired.sum() == 1  # refractory: the step is one alert, not a hundred


def test_noise_alone_rarely_fires() -> None:
    bank = DetectorBank()
    slots = np.array([bank.slot(f"s{i}") for i in range(50)])
    values = noisy(50 * 3000, seed=3).reshape(3000, 50)
    fired = sum(int(bank.update(slots, values[t]).is_anomaly.sum()) for t in range(3000))
    assert fired <= 5  # 150k Gaussian samples


def test_feature_and_expected_explain_a_step() -> None:
    bank = DetectorBank()
    slot = bank.slot("temp")
    for v in noisy(600):
        bank.update(np.array([slot]), np.array([v]))
    r = bank.update(np.array([slot]), np.array([91.0]))
    assert r.is_anomaly[0]
    assert DetectorBank.FEATURES[r.feature[0]] in DetectorBank.FEATURES
    assert 45.0 < r.expected[0] < 55.0


def test_nan_is_missing_and_leaves_state_untouched() -> None:
    a, b = DetectorBank(), DetectorBank()
    values = noisy(300)
    with_gaps = np.insert(values, [50, 100, 100, 250], np.nan)
    sa, _ = feed(a, "s", values)
    sb, _ = feed(b, "s", with_gaps)
    gaps = np.isnan(with_gaps)
    assert (sb[gaps] == 0.0).all()
    assert np.array_equal(sb[~gaps], sa)


def test_repeated_slots_are_processed_in_order() -> None:
    values = noisy(40, seed=1)
    one_by_one = DetectorBank()
    sa, _ = feed(one_by_one, "x", values)
    batched = DetectorBank()
    x, y = batched.slot("x"), batched.slot("y")
    slots = np.array([x, y] * 40)
    mixed = np.ravel(np.column_stack([values, values[::-1]]))
    r = batched.update(slots, mixed)
    assert np.array_equal(r.score[0::2], sa)


def test_save_load_round_trip_gives_identical_next_scores(tmp_path: Path) -> None:
    bank = DetectorBank(DetectorParams(refractory=7), capacity=2)
    slots = np.array([bank.slot(k) for k in ("a", "b", "c")])
    rng = np.random.default_rng(5)
    for _ in range(200):
        bank.update(slots, rng.normal(size=3))
    path = tmp_path / "bank.npz"
    bank.save(path)
    loaded = DetectorBank.load(path)
    assert loaded.keys() == bank.keys() and loaded.params == bank.params
    nxt = rng.normal(size=(50, 3)) * 4
    for row in nxt:
        ra, rb = bank.update(slots, row), loaded.update(slots, row)
        assert np.array_equal(ra.score, rb.score)
        assert np.array_equal(ra.is_anomaly, rb.is_anomaly)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize("content", [b"", b"not a zip", b"PK\x03\x04garbage"])
def test_loading_a_corrupt_file_names_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bank.npz"
    path.write_bytes(content)
    with pytest.raises(BankFileError, match=r"bank\.npz"):
        DetectorBank.load(path)


def test_loading_another_version_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    meta = b'{"format": "llmops-detector-bank", "version": 99}'
    with path.open("wb") as handle:
        np.savez(handle, meta=np.frombuffer(meta, np.uint8))
    with pytest.raises(BankFileError, match=r"other\.npz.*version 99"):
        DetectorBank.load(path)
    with pytest.raises(BankFileError, match=r"missing\.npz"):
        DetectorBank.load(tmp_path / "missing.npz")


def test_params_are_validated() -> None:
    with pytest.raises(ValueError, match="slow_span"):
        DetectorParams(slow_span=0.0)
    with pytest.raises(ValueError, match="threshold"):
        DetectorParams(threshold=0.0)


def test_clone_and_pickle() -> None:
    d = OnlineDetector(slow_span=64.0, refractory=3)
    for v in noisy(100):
        d.learn_one({"value": v})
    c = d.clone()
    assert isinstance(c, OnlineDetector) and c.slow_span == 64.0 and c.refractory == 3
    assert c.score_one({"value": 1.0}) == 0.0  # a clone starts unfitted
    p = pickle.loads(pickle.dumps(d))
    assert p.score_one({"value": 60.0}) == d.score_one({"value": 60.0})
    assert copy.deepcopy(d).score_one({"value": 60.0}) == d.score_one({"value": 60.0})


@pytest.mark.parametrize("params", list(OnlineDetector._unit_test_params()))
def test_river_conformance(params: dict[str, float]) -> None:
    """River's own general estimator checks (its dataset checks need scikit-learn)."""
    from river.checks import common

    model = OnlineDetector(**params)
    for check in (common.check_repr, common.check_str, common.check_tags,
                  common.check_clone_same_class, common.check_clone_is_idempotent,
                  common.check_init_has_default_params_for_tests,
                  common.check_init_default_params_are_not_mutable, common.check_doc,
                  common.check_clone_changes_memory_addresses,
                  common.check_mutate_can_be_idempotent,
                  common.check_pickling_supports_roundtrip, common.check_repr_roundtrips_clone,
                  common.check_clone_with_new_params_applies,
                  common.check_get_params_matches_signature):
        check(copy.deepcopy(model))
    for v in noisy(50):
        assert isinstance(model.score_one({"value": v}), float)
        assert model.learn_one({"value": v}) is None
    # the single numeric feature is used whatever its name; an empty dict is a missing value
    assert OnlineDetector().score_one({"cpu": 3.0}) == 0.0
    assert OnlineDetector().score_one({}) == 0.0


def daily(periods: int, seed: int = 0, period: int = 96) -> np.ndarray:
    """A square daily shape (20 for two thirds of a day, 80 for one third), a little noise."""
    shape = np.r_[np.full(2 * period // 3, 20.0), np.full(period // 3, 80.0)]
    return np.tile(shape, periods) + np.random.default_rng(seed).normal(size=periods * period)


def test_a_recurring_shape_stops_firing_once_it_has_been_seen() -> None:
    _, fired = feed(DetectorBank(), "cpu", daily(60))
    assert not fired[96 * 10:].any()  # every day jumps by 60 deviations of its noise


def test_a_novel_shape_in_a_periodic_series_fires() -> None:
    values = daily(40)
    day = 96 * 30
    values[day + 64: day + 96] = 50.0 + np.random.default_rng(1).normal(size=32)  # a dim day
    _, fired = feed(DetectorBank(), "cpu", values)
    assert not fired[96 * 10: day + 64].any()
    assert fired[day + 64: day + 72].any()


def test_a_series_that_goes_flat_fires_as_a_flatline() -> None:
    bank = DetectorBank()
    slot = bank.slot("exporter")
    values = np.r_[noisy(1500, seed=2), np.full(100, 50.0)]
    hits = []
    for t, v in enumerate(values):
        r = bank.update(np.array([slot]), np.array([v]))
        if r.is_anomaly[0]:
            hits.append((t, DetectorBank.FEATURES[r.feature[0]], r.expected[0]))
    assert [h for h in hits if h[0] < 1500] == []
    assert hits and 1500 < hits[0][0] < 1560
    assert hits[0][1] == "flatline" and 45.0 < hits[0][2] < 55.0


def test_a_sparse_counter_sitting_at_zero_is_not_a_flatline() -> None:
    bank = DetectorBank()
    slot = bank.slot("errors")
    values = np.zeros(3000)
    values[::97] = 5.0  # a periodic burst; flat in between, as it always is
    for v in values:
        r = bank.update(np.array([slot]), np.array([v]))
        assert not (r.is_anomaly[0] and DetectorBank.FEATURES[r.feature[0]] == "flatline")


def test_the_score_is_suppressed_for_the_refractory_period_after_a_detection() -> None:
    params = DetectorParams(refractory=50)
    bank = DetectorBank(params)
    values = np.r_[noisy(600), [90.0, 91.0, 89.0], noisy(100, seed=4)]
    scores, fired = feed(bank, "s", values)
    assert fired[600] and (scores[601:651] == 0.0).all()
    assert np.array_equal(fired, scores >= params.threshold)  # the decision is the score


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_a_gross_step_fires_early_in_a_series_life(noise: float) -> None:
    values = 35.0 + noise * np.random.default_rng(6).normal(size=31)
    values[30] = 93.0  # a GPU at 35 C for 30 samples, then 93 C
    bank = DetectorBank()
    slot = bank.slot("gpu0/temperature")
    for v in values[:30]:
        assert not bank.update(np.array([slot]), np.array([v])).is_anomaly[0]
    r = bank.update(np.array([slot]), np.array([93.0]))
    assert r.is_anomaly[0] and 30.0 < r.expected[0] < 40.0


def test_loading_a_version_1_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "detectors.npz"
    meta = b'{"format": "llmops-detector-bank", "version": 1}'
    with path.open("wb") as handle:
        np.savez(handle, meta=np.frombuffer(meta, np.uint8))
    with pytest.raises(BankFileError, match=r"detectors\.npz.*version 1, this code reads 3"):
        DetectorBank.load(path)


def cron(periods: int, period: int = 200, height: float = 40.0) -> np.ndarray:
    """Noise around 50 with a one-sample spike of ``height`` deviations every ``period``."""
    values = noisy(periods * period, seed=7)
    values[period - 1:: period] += height
    return values


def test_a_periodic_spike_stops_firing_but_a_bigger_or_unscheduled_one_fires() -> None:
    values = cron(30)
    values[200 * 20 - 1] += 200.0  # a job that suddenly does six times as much
    values[200 * 25 + 99] += 40.0  # the usual spike, half a period off its schedule
    _, fired = feed(DetectorBank(), "host/disk_write", values)
    spikes = np.flatnonzero(fired)
    assert set(spikes) <= set(range(199, 6000, 200)) | {200 * 25 + 99}
    assert all(t < 200 * 4 for t in spikes if t < 200 * 19)  # only the first few
    assert 200 * 20 - 1 in spikes and 200 * 25 + 99 in spikes


def test_a_periodic_spike_keeps_firing_without_the_schedule() -> None:
    """The same series fires at every spike when they come at irregular times."""
    values = noisy(6000, seed=7)
    at = np.cumsum(np.random.default_rng(8).integers(100, 400, size=20))
    values[at[at < 6000]] += 40.0
    _, fired = feed(DetectorBank(), "host/disk_write", values)
    assert fired[at[at < 6000]][5:].sum() >= 5
