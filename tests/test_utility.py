import numpy as np
import pytest
from scipy import stats as sps

from layerlens_jax._src.profile import LayerStats
from layerlens_jax._src.sites import Site
from layerlens_jax._src.utility import UtilityConfig, utility, utility_report


def make_stats(fisher, grad, sampled=None, params=None):
    n = len(fisher)
    params = params or [10] * n
    sites = tuple(Site(path=f"s{i}", kind="linear", module_type="Linear", param_shapes={},
                       num_params=params[i]) for i in range(n))
    return LayerStats(grad_norm=np.asarray(grad, float), fisher_trace=np.asarray(fisher, float),
                      fisher_trace_sampled=None if sampled is None else np.asarray(sampled, float),
                      num_examples=8, num_tokens=8, num_batches=1, sites=sites)


def test_default_formula_by_hand():
    f = np.array([4.0, 2.0, 1.0, 0.0])
    g = np.array([1.0, 2.0, 0.5, 0.0])
    u = utility(make_stats(f, g))
    expect = 0.75 * f / 4.0 + 0.25 * g**2 / 4.0
    np.testing.assert_allclose(u, expect / expect.max())
    assert u.max() == 1.0


def test_weights_transform_per_param_and_sampled():
    f, g = np.array([4.0, 1.0, 9.0]), np.array([1.0, 1.0, 2.0])
    st = make_stats(f, g, sampled=[1.0, 2.0, 3.0], params=[1, 2, 3])
    np.testing.assert_allclose(utility(st, UtilityConfig(fisher_weight=1, grad_weight=0)), f / 9)
    np.testing.assert_allclose(
        utility(st, UtilityConfig(fisher_weight=1, grad_weight=0, transform="sqrt")), np.sqrt(f) / 3)
    pp = utility(st, UtilityConfig(fisher_weight=1, grad_weight=0, per_param=True))
    np.testing.assert_allclose(pp, (f / [1, 2, 3]) / 4.0)
    np.testing.assert_allclose(
        utility(st, UtilityConfig(fisher_weight=1, grad_weight=0, source="sampled")), [1 / 3, 2 / 3, 1])
    with pytest.raises(ValueError, match="sample_loss_fn"):
        utility(make_stats(f, g), UtilityConfig(source="sampled"))


def test_bad_config_and_stats_are_named():
    with pytest.raises(ValueError, match="fisher_weight"):
        UtilityConfig(fisher_weight=-1)
    with pytest.raises(ValueError, match="transform"):
        UtilityConfig(transform="log")
    with pytest.raises(ValueError, match=r"unknown utility config key\(s\) \['wieght'\]"):
        UtilityConfig.from_dict({"wieght": 1})
    with pytest.raises(ValueError, match="site 's1'"):
        utility(make_stats([1.0, np.nan, 2.0], [1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="zero gradient"):
        utility(make_stats([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]))


def test_report_matches_scipy_and_renders():
    rng = np.random.default_rng(0)
    f = rng.gamma(1.0, size=12)
    g = np.sqrt(f) * rng.uniform(0.3, 1.0, size=12)
    st = make_stats(f, g)
    u = utility(st)
    rep = utility_report(st, u)
    assert rep.grad_corr == pytest.approx(sps.pearsonr(u, g).statistic)
    assert rep.fisher_corr == pytest.approx(sps.pearsonr(u, f).statistic)
    assert rep.fisher_p == pytest.approx(sps.pearsonr(u, f).pvalue)
    assert rep.cv == pytest.approx(u.std() / u.mean())
    md = rep.to_markdown()
    assert "| Fisher Correlation | >= 0.95 |" in md and md.count("\n") == 4
    assert rep.to_dict()["checks"]["fisher_corr"] == (rep.fisher_corr >= 0.95)
    with pytest.raises(ValueError, match="shape"):
        utility_report(st, u[:-1])
