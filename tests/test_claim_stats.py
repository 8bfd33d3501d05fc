"""benchmarks/claim_stats.py against printed t tables, closed forms and hand-computed examples."""

import math

import pytest
from _scripts import load_script


def load_stats():
    return load_script("benchmarks/claim_stats.py", "claim_stats")


# Student's t critical values t_{q, df} as printed in standard tables (3 decimals).
T_TABLE = [
    (0.95, 1, 6.314), (0.95, 2, 2.920), (0.95, 4, 2.132), (0.95, 9, 1.833), (0.95, 19, 1.729), (0.95, 30, 1.697),
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 9, 2.262), (0.975, 29, 2.045),
    (0.99, 9, 2.821), (0.995, 9, 3.250), (0.9995, 9, 4.781),
]


@pytest.mark.parametrize("q,df,t", T_TABLE)
def test_t_cdf_and_quantile_match_the_printed_table(q, df, t):
    stats = load_stats()
    assert stats.t_quantile(q, df) == pytest.approx(t, abs=6e-4)
    assert stats.t_cdf(t, df) == pytest.approx(q, abs=2e-4)
    assert stats.t_cdf(-t, df) == pytest.approx(1 - q, abs=2e-4)  # symmetric


def test_t_cdf_closed_forms():
    stats = load_stats()
    for x in (-7.5, -1.0, -0.2, 0.0, 0.3, 1.0, 2.5, 40.0):
        # df = 1 is the Cauchy distribution; df = 2 has F(t) = 1/2 + t / (2 sqrt(t^2 + 2))
        assert stats.t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-12)
        assert stats.t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(x * x + 2)), abs=1e-12)
    # large df: the standard normal, Phi(1.96) = 0.975002
    assert stats.t_cdf(1.959964, 1e7) == pytest.approx(0.975, abs=1e-6)
    with pytest.raises(ValueError):
        stats.t_cdf(1.0, 0)


def test_paired_t_hand_computed():
    stats = load_stats()
    r = stats.paired_t([1.0, 2.0, 3.0], "greater")
    # mean 2, sd 1, se 1/sqrt(3), t = 2 sqrt(3); df = 2: p = 1/2 - t / (2 sqrt(t^2 + 2))
    t = 2 * math.sqrt(3)
    assert (r["mean"], r["sd"], r["df"]) == (2.0, 1.0, 2)
    assert r["t"] == pytest.approx(t) and r["d"] == pytest.approx(2.0)
    assert r["p"] == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), rel=1e-10)
    assert stats.paired_t([1.0, 2.0, 3.0], "less")["p"] == pytest.approx(1 - r["p"], rel=1e-10)
    assert stats.paired_t([1.0, 2.0, 3.0], "two-sided")["p"] == pytest.approx(2 * r["p"], rel=1e-10)
    assert math.isnan(stats.paired_t([0.5], "greater")["p"])  # one seed: no test
    with pytest.raises(ValueError):
        stats.paired_t([1.0, 2.0], "bigger")


def test_holm_matches_a_hand_computed_example():
    stats = load_stats()
    # sorted p: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> max so far 0.06)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = stats.holm([0.02, float("nan"), 0.01])  # NaN is left out of m
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_seeds_needed_matches_power_tables():
    stats = load_stats()
    # one-sided paired t, alpha 0.05, power 0.8 (G*Power's exact values: 71, 27, 12, 8)
    assert [stats.seeds_needed(d, 0.05) for d in (0.3, 0.5, 0.8, 1.0)] == [71, 27, 12, 8]
    assert stats.seeds_needed(0.0, 0.05) is None


def test_interpolation_and_leave_one_out():
    stats = load_stats()
    pts = [(3.0, 30.0), (1.0, 10.0), (2.0, 40.0)]  # unsorted on purpose
    assert stats.interpolate(pts, 1.5) == pytest.approx(25.0)
    assert stats.interpolate(pts, 2.5) == pytest.approx(35.0)
    assert stats.interpolate(pts, 3.0) == pytest.approx(30.0)
    assert stats.interpolate(pts, 0.5) is None and stats.interpolate(pts, 3.5) is None  # no extrapolation
    assert stats.interpolate([(1.0, 1.0), (1.0, 3.0), (2.0, 4.0)], 1.0) == pytest.approx(2.0)  # equal x averaged
    score = {("a", 0): 1.0, ("a", 1): 0.0, ("a", 2): 0.0, ("b", 0): 0.0, ("b", 1): 1.0, ("b", 2): 0.5}
    choice = stats.leave_one_out_choice(["a", "b"], [0, 1, 2], lambda o, s: score[(o, s)])
    # seed 0 sees seeds 1, 2: a 0.0, b 0.75 -> b; seed 1 sees 0, 2: a 0.5, b 0.25 -> a; seed 2 sees 0, 1: tie -> a
    assert choice == {0: "b", 1: "a", 2: "a"}
