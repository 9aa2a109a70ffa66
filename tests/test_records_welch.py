"""The one-sided Welch t-test of records/make_record.py against values computed here by hand."""
import math

import pytest
from records_fixtures import A1493, load_make_record

mr = load_make_record()
A1493_TTT = [A1493[s][0][3] for s in (42, 314, 999)]


def t_upper_tail(t: float, df: float, n: int = 20000) -> float:
    """P(T_df >= t) by Simpson's rule on x = t + u/(1-u), u in [0, 1): no scipy."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def f(u):
        if u >= 1.0:
            return 0.0
        x = t + u / (1 - u)
        return c * (1 + x * x / df) ** (-(df + 1) / 2) / (1 - u) ** 2

    h = 1.0 / n
    total = f(0.0) + f(1.0) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
    return total * h / 3


def welch_by_hand(new, base, margin):
    def mv(xs):
        m = sum(xs) / len(xs)
        return m, sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    (mn, vn), (mb, vb) = mv(new), mv(base)
    a, b = vn / len(new), vb / len(base)
    t = (mb - mn - margin) / math.sqrt(a + b)
    df = (a + b) ** 2 / (a * a / (len(new) - 1) + b * b / (len(base) - 1))
    return mn - mb, t, df, t_upper_tail(t, df)


@pytest.mark.parametrize("new, base", [
    ([2.7800, 2.7812, 2.7795], A1493_TTT),  # 0.0117 nats better: significant
    ([2.7855, 2.7871, 2.7840, 2.7862, 2.7849], A1493_TTT),  # 0.0065 better, unequal n
    ([2.7900, 2.7915, 2.7890], A1493_TTT),  # 0.0019 better: below the margin
])
def test_welch_matches_hand_formula(new, base):
    delta, t, df, p = welch_by_hand(new, base, 0.005)
    res = mr.welch_improvement_test(new, base, margin=0.005, alpha=0.01)
    assert res["mean_delta_nats"] == pytest.approx(delta, abs=1e-12)
    assert res["t"] == pytest.approx(t, rel=1e-9)
    assert res["df"] == pytest.approx(df, rel=1e-9)
    assert res["p_value"] == pytest.approx(p, rel=1e-5, abs=1e-12)
    assert res["significant"] == (p < 0.01)


def test_welch_known_verdicts():
    assert mr.welch_improvement_test([2.7800, 2.7812, 2.7795], A1493_TTT)["significant"] is True
    assert mr.welch_improvement_test([2.7900, 2.7915, 2.7890], A1493_TTT)["significant"] is False
    # Same losses as the baseline: an improvement of more than 0.005 nats is not supported at all.
    same = mr.welch_improvement_test(A1493_TTT, A1493_TTT)
    assert same["mean_delta_nats"] == 0 and same["p_value"] > 0.99


def test_welch_degenerate_inputs():
    assert mr.welch_improvement_test([2.78], A1493_TTT)["p_value"] is None  # one seed: no variance
    flat = mr.welch_improvement_test([2.70, 2.70], [2.80, 2.80])  # no spread: the ordering decides
    assert flat["significant"] is True and flat["p_value"] == 0.0


def test_mean_std_is_sample_std():
    m, s = mr.mean_std([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and s == pytest.approx(math.sqrt(5 / 3))
    assert mr.mean_std([1.5]) == (1.5, 0.0)
