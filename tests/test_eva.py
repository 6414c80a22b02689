"""EVA: statistics against numpy SVDs of the masked site inputs, planted spectra -> hand-computed
ranks (HF PEFT's pooled rule), budgets, A initialisation, identity at init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerlens_jax._src.eva import (EvaStatistics, eva_allocate, eva_allocate_params, eva_init,
                                    eva_plan, eva_statistics)
from layerlens_jax._src.peft import LoRA, apply_plan
from layerlens_jax._src.sites import Site, discover_sites, get_submodule
from layerlens_jax.models import BertClassifier, BertConfig

# ------------------------------------------------------------------------------ planted spectra

D = 8
#: Eigenvalues of the centred input scatter of each site (each sums to 100 -> ratio = value / 100).
SPECTRA = {
    "a": [50, 30, 10, 5, 3, 1, 1, 0],
    "b": [12.5] * 8,
    "c": [90, 4, 2, 1, 1, 1, 1, 0],
}


class Parallel(nnx.Module):
    """Three independent Linear sites, each fed its own input."""

    def __init__(self, rngs):
        self.a = nnx.Linear(D, 3, rngs=rngs)
        self.b = nnx.Linear(D, 5, rngs=rngs)
        self.c = nnx.Linear(D, 3, rngs=rngs)

    def __call__(self, xa, xb, xc):
        return self.a(xa), self.b(xb), self.c(xc)


def forward_parallel(m, b):
    return m(b["a"], b["b"], b["c"])


def planted(eigvals, seed, n=48):
    """(n, D) rows, exactly centred, whose centred scatter has eigenvalues ``eigvals`` and
    eigenvectors the columns of the returned orthogonal V."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n, D))
    u, _ = np.linalg.qr(g - g.mean(0))  # orthonormal columns, each orthogonal to the ones vector
    v, _ = np.linalg.qr(rng.normal(size=(D, D)))
    x = u @ np.diag(np.sqrt(eigvals)) @ v.T + rng.normal(size=D)  # any mean: PCA centres it
    return x, v


@pytest.fixture(scope="module")
def parallel():
    model = Parallel(nnx.Rngs(0))
    data = {k: planted(SPECTRA[k], seed=i) for i, k in enumerate("abc")}
    # two batches of (4, 6) tokens
    batches = [{k: jnp.asarray(x[24 * j: 24 * (j + 1)].reshape(4, 6, D), jnp.float32)
                for k, (x, _) in data.items()} for j in range(2)]
    stats = eva_statistics(model, batches, ["a", "b", "c"], forward=forward_parallel)
    return model, data, batches, stats


def test_planted_spectra_recovered(parallel):
    _, data, _, stats = parallel
    for k in "abc":
        st = stats[k]
        assert st.num_tokens == 48 and st.centred
        np.testing.assert_allclose(st.singular_values ** 2, SPECTRA[k], atol=2e-3)
        np.testing.assert_allclose(st.explained_variance_ratio, np.asarray(SPECTRA[k]) / 100,
                                   atol=2e-5)
    for k in "ac":  # the leading, non-degenerate components match the planted directions
        v = data[k][1]
        cos = np.abs(np.sum(stats[k].components[:, :3] * v[:, :3], axis=0))
        np.testing.assert_allclose(cos, 1.0, atol=1e-4)


@pytest.mark.parametrize("rank,rho,expected", [
    # cap 4, budget 6: pool .9(c) .5(a) .3(a) .125(b) x3 beat .1(a)
    (2, 2.0, {"a": 2, "b": 3, "c": 1}),
    # cap 2, budget 6 = the whole pool: rho 1 is uniform
    (2, 1.0, {"a": 2, "b": 2, "c": 2}),
    # cap 2, budget 3: .9(c) .5(a) .3(a); b gets no LoRA
    (1, 2.0, {"a": 2, "b": 0, "c": 1}),
    # cap round(1.5 * 2) = 3, budget 6: .9 .5 .3 .125 .125 .125 (.1(a) is 7th)
    (2, 1.5, {"a": 2, "b": 3, "c": 1}),
    # cap 8, budget 3: .9 .5 .3
    (1, 8.0, {"a": 2, "b": 0, "c": 1}),
])
def test_planted_ranks(parallel, rank, rho, expected):
    stats = parallel[3]
    ranks = eva_allocate(stats, rank=rank, rho=rho, sites=["a", "b", "c"])
    assert ranks == expected
    assert sum(ranks.values()) == rank * 3


def test_params_budget_planted(parallel):
    model, _, batches, stats = parallel
    sites = discover_sites(model, example=(batches[0]["a"], batches[0]["b"], batches[0]["c"]))
    assert [(s.path, s.in_features, s.out_features) for s in sites] == \
        [("a", 8, 3), ("b", 8, 5), ("c", 8, 3)]
    # per rank: a 11, b 13, c 11. Pooled order (cap 4): c0 a0 a1 b0 b1 b2 b3 a2 a3 c1 c2 c3.
    # 72 = c0 a0 a1 (33) + b0 b1 b2 (39): the rank-unit answer
    kw = dict(rank=2, rho=2.0, sites=sites)
    assert eva_allocate_params(stats, params_budget=72, **kw) == {"a": 2, "b": 3, "c": 1}
    # 70: after b1 11 are left; b2, b3 (13) no longer fit, a2 (11) does
    assert eva_allocate_params(stats, params_budget=70, **kw) == {"a": 3, "b": 2, "c": 1}
    # 66: after b1 7 are left; nothing else fits
    assert eva_allocate_params(stats, params_budget=66, **kw) == {"a": 2, "b": 2, "c": 1}
    assert eva_allocate_params(stats, params_budget=10, **kw) == {"a": 0, "b": 0, "c": 0}


def test_plan_and_init_on_planted(parallel):
    model, data, batches, stats = parallel
    sites = discover_sites(model, example=(batches[0]["a"], batches[0]["b"], batches[0]["c"]))
    ranks = eva_allocate(stats, rank=1, rho=2.0, sites=sites)
    plan = eva_plan(sites, ranks, peft_options={"lora_alpha": 8.0})
    assert plan.assignments() == {"a": ("lora", 2), "c": ("lora", 1)}
    assert plan.allocation("b").method == "none" and plan.sites == ("a", "b", "c")
    assert plan.use["params"] == 2 * 11 + 1 * 11
    assert plan.solver == "eva" and plan.metadata["eva_ranks"] == ranks
    adapted = eva_init(apply_plan(model, plan), stats, ranks)
    for k in "ac":
        a = np.asarray(getattr(adapted, k).peft_lora_a[...])
        v = data[k][1][:, : ranks[k]]
        np.testing.assert_allclose(np.abs(np.sum(a * v, axis=0)), 1.0, atol=1e-4)
        assert not np.any(getattr(adapted, k).peft_lora_b[...])
    assert not isinstance(adapted.b, LoRA)
    out0, out1 = forward_parallel(model, batches[0]), forward_parallel(adapted, batches[0])
    for y0, y1 in zip(out0, out1):
        np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))


# -------------------------------------------------------------------- statistics vs numpy SVD


class Two(nnx.Module):
    def __init__(self, rngs):
        self.l0 = nnx.Linear(6, 5, rngs=rngs)
        self.l1 = nnx.Linear(5, 4, rngs=rngs)

    def __call__(self, x):
        return self.l1(jax.nn.gelu(self.l0(x)))


def forward_two(m, b):
    return m(b["x"])


def np_gelu(x):  # jax.nn.gelu's default tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.fixture(scope="module")
def two():
    model = Two(nnx.Rngs(1))
    rng = np.random.default_rng(3)
    batches = []
    for n_pad in ((0, 2, 5), (3, 0, 1)):
        x = rng.normal(size=(3, 7, 6)) @ rng.normal(size=(6, 6)) + 0.5
        mask = np.ones((3, 7), np.int32)
        for i, p in enumerate(n_pad):
            if p:
                mask[i, -p:] = 0
                x[i, -p:] = 1e3  # garbage under the padding: must not leak into the statistics
        batches.append({"x": jnp.asarray(x, jnp.float32), "attention_mask": jnp.asarray(mask)})
    return model, batches


def site_inputs_np(model, batches):
    """The kept rows of each site's input, computed in numpy (float64) from the kernels."""
    x0 = np.concatenate([np.asarray(b["x"], np.float64)[np.asarray(b["attention_mask"]) > 0]
                         for b in batches])
    w0, b0 = (np.asarray(v[...], np.float64) for v in (model.l0.kernel, model.l0.bias))
    return {"l0": x0, "l1": np_gelu(x0 @ w0 + b0)}


def assert_matches_svd(st: EvaStatistics, x: np.ndarray):
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    assert st.num_tokens == x.shape[0]
    np.testing.assert_allclose(st.singular_values[: s.size], s, rtol=2e-4, atol=1e-4)
    np.testing.assert_allclose(st.explained_variance_ratio[: s.size], s ** 2 / np.sum(s ** 2),
                               rtol=2e-4, atol=1e-7)
    cos = np.abs(np.sum(st.components[:, : s.size] * vt.T, axis=0))
    np.testing.assert_allclose(cos, 1.0, atol=1e-4)
    # HF svd_flip(u_based_decision=False): each component's largest-magnitude entry is positive
    c = st.components
    assert np.all(c[np.argmax(np.abs(c), axis=0), np.arange(c.shape[1])] > 0)


@pytest.mark.parametrize("center", [True, False])
def test_statistics_equal_numpy_svd_of_masked_inputs(two, center):
    model, batches = two
    stats = eva_statistics(model, batches, ["l0", "l1"], forward=forward_two, center=center)
    ref = site_inputs_np(model, batches)
    assert ref["l0"].shape[0] == 42 - 11
    for path, x in ref.items():
        assert_matches_svd(stats[path], x - x.mean(0) if center else x)


def test_padded_tokens_are_excluded(two):
    model, batches = two
    masked = eva_statistics(model, batches, ["l0", "l1"], forward=forward_two)
    kept = [{"x": b["x"][np.asarray(b["attention_mask"]) > 0][None]} for b in batches]
    compact = eva_statistics(model, kept, ["l0", "l1"], forward=forward_two, token_mask=None)
    unmasked = eva_statistics(model, batches, ["l0"], forward=forward_two, token_mask=None)
    for p in ("l0", "l1"):
        assert masked[p].num_tokens == compact[p].num_tokens == 31
        np.testing.assert_allclose(masked[p].singular_values, compact[p].singular_values,
                                   rtol=1e-5, atol=1e-5)
    assert unmasked["l0"].num_tokens == 42 and unmasked["l0"].singular_values[0] > 1e3


def test_max_components_truncates(two):
    model, batches = two
    full = eva_statistics(model, batches, ["l0"], forward=forward_two)["l0"]
    top = eva_statistics(model, batches, ["l0"], forward=forward_two, max_components=2)["l0"]
    assert top.components.shape == (6, 2)
    np.testing.assert_allclose(top.explained_variance_ratio, full.explained_variance_ratio[:2])


def test_init_sets_a_to_right_singular_vectors(two):
    model, batches = two
    stats = eva_statistics(model, batches, ["l0", "l1"], forward=forward_two)
    ref = site_inputs_np(model, batches)
    ranks = {"l0": 2, "l1": 3}
    sites = discover_sites(model, example=(batches[0]["x"],))
    adapted = apply_plan(model, eva_plan(sites, ranks))
    init = eva_init(adapted, stats, ranks)
    whitened = eva_init(adapted, stats, ranks, whiten=True)
    assert not np.any(np.asarray(adapted.l0.peft_lora_a[...]) != np.asarray(
        apply_plan(model, eva_plan(sites, ranks)).l0.peft_lora_a[...]))  # not in place
    for p, r in ranks.items():
        x = ref[p] - ref[p].mean(0)
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        a = np.asarray(get_submodule(init, p).peft_lora_a[...])
        assert a.shape == (x.shape[1], r)
        signs = np.sign(np.sum(a * vt[:r].T, axis=0))
        np.testing.assert_allclose(a, vt[:r].T * signs, atol=1e-4)
        aw = np.asarray(get_submodule(whitened, p).peft_lora_a[...])
        np.testing.assert_allclose(aw, vt[:r].T * signs / np.sqrt(s[:r]), rtol=1e-3, atol=1e-4)
        assert not np.any(np.asarray(get_submodule(init, p).peft_lora_b[...]))
    np.testing.assert_array_equal(np.asarray(forward_two(init, batches[1])),
                                  np.asarray(forward_two(model, batches[1])))


def test_init_errors(two):
    model, batches = two
    stats = eva_statistics(model, batches, ["l0", "l1"], forward=forward_two)
    sites = discover_sites(model, example=(batches[0]["x"],))
    adapted = apply_plan(model, eva_plan(sites, {"l0": 2, "l1": 0}))
    with pytest.raises(ValueError, match="'l0'.*LoRA rank 2.*rank 3"):
        eva_init(adapted, stats, {"l0": 3})
    with pytest.raises(ValueError, match="'l1' has rank 1 but carries no LoRA"):
        eva_init(adapted, stats, {"l1": 1})
    with pytest.raises(ValueError, match="'l1'"):
        eva_init(apply_plan(model, {"l1": ("lora", 9)}), stats, {"l1": 9})  # 5 components only


# ----------------------------------------------------------------------------- allocation rules


def fake_stats(rng, n_sites, k):
    stats = {}
    for i in range(n_sites):
        lam = np.sort(rng.gamma(0.5, size=k))[::-1]
        stats[f"s{i}"] = EvaStatistics(site=f"s{i}", singular_values=np.sqrt(lam),
                                       components=np.eye(k), explained_variance_ratio=lam / lam.sum(),
                                       num_tokens=100, centred=True)
    return stats


def threshold_reference(stats, paths, rank, rho):
    """Independent formulation: keep every capped ratio >= the budget-th largest pooled ratio."""
    cap = int(round(rank * rho))
    pooled = np.sort(np.concatenate([stats[p].explained_variance_ratio[:cap] for p in paths]))[::-1]
    budget = rank * len(paths)
    t = pooled[budget - 1] if budget <= pooled.size else -np.inf
    return {p: int(np.sum(stats[p].explained_variance_ratio[:cap] >= t)) for p in paths}


def test_rank_budget_is_rank_times_targets():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n_sites, rank = int(rng.integers(1, 7)), int(rng.integers(1, 5))
        rho = float(rng.choice([1.0, 1.5, 2.0, 3.0]))
        stats = fake_stats(rng, n_sites, k=16)
        paths = list(stats)
        ranks = eva_allocate(stats, rank=rank, rho=rho, sites=paths)
        assert ranks == threshold_reference(stats, paths, rank, rho), trial
        assert sum(ranks.values()) == rank * n_sites
        assert max(ranks.values()) <= round(rank * rho)
        if rho == 1.0:
            assert set(ranks.values()) == {rank}


def test_small_layers_cap_the_pool():
    rng = np.random.default_rng(1)
    stats = fake_stats(rng, 2, k=3)  # only 3 components per site, cap 8
    assert eva_allocate(stats, rank=4, rho=2.0, sites=list(stats)) == {"s0": 3, "s1": 3}


def make_sites(rng, n):
    return [Site(path=f"s{i}", kind="linear", module_type="Linear", param_shapes={},
                 num_params=0, in_features=16, out_features=int(rng.integers(2, 40)))
            for i in range(n)]


def test_params_budget_never_exceeded_and_filled():
    rng = np.random.default_rng(2)
    for trial in range(200):
        n, rank, rho = int(rng.integers(1, 6)), int(rng.integers(1, 5)), float(rng.choice([1, 2]))
        sites = make_sites(rng, n)
        stats = fake_stats(rng, n, k=16)
        cost = {s.path: s.in_features + s.out_features for s in sites}
        budget = float(rng.uniform(0, 1.5) * rank * sum(cost.values()))
        ranks = eva_allocate_params(stats, params_budget=budget, rank=rank, rho=rho, sites=sites)
        used = sum(ranks[p] * cost[p] for p in ranks)
        assert used <= budget + 1e-9, trial
        cap = round(rank * rho)
        assert all(0 <= r <= cap for r in ranks.values())
        left = budget - used
        assert all(ranks[p] == cap or cost[p] > left for p in ranks), trial  # nothing else fits


def test_params_budget_equals_rank_budget_for_equal_shapes():
    rng = np.random.default_rng(3)
    for _ in range(50):
        sites = [Site(path=f"s{i}", kind="linear", module_type="Linear", param_shapes={},
                      num_params=0, in_features=16, out_features=16) for i in range(4)]
        stats = fake_stats(rng, 4, k=16)
        by_rank = eva_allocate(stats, rank=3, rho=2.0, sites=sites)
        by_params = eva_allocate_params(stats, params_budget=3 * 4 * 32, rank=3, rho=2.0,
                                        sites=sites)
        assert by_rank == by_params


def test_allocation_errors():
    stats = fake_stats(np.random.default_rng(4), 2, k=4)
    with pytest.raises(ValueError, match="rho must be >= 1"):
        eva_allocate(stats, rank=2, rho=0.5, sites=list(stats))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        eva_allocate(stats, rank=0, rho=1.0, sites=list(stats))
    with pytest.raises(ValueError, match="no statistics for site 'zz'"):
        eva_allocate(stats, rank=2, rho=1.0, sites=["s0", "zz"])
    with pytest.raises(TypeError, match="Site objects"):
        eva_allocate_params(stats, params_budget=10, rank=1, rho=1.0, sites=["s0"])


# ------------------------------------------------------------------------------ BERT end to end


def forward_bert(m, b):
    return m(b["input_ids"], b["attention_mask"])


@pytest.fixture(scope="module")
def bert():
    model = BertClassifier(BertConfig.tiny(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(5)
    mask = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4], jnp.int32)
    batches = [{"input_ids": jnp.asarray(rng.integers(1, 50, (3, 7)), jnp.int32),
                "attention_mask": mask} for _ in range(2)]
    sites = discover_sites(model, example=(batches[0]["input_ids"], mask))
    targets = [s for s in sites if s.path.rsplit("/", 1)[-1] in ("query", "value")]
    return model, batches, sites, targets


def test_bert_end_to_end(bert):
    model, batches, sites, targets = bert
    assert len(targets) == 4
    stats = eva_statistics(model, batches, targets, forward=forward_bert)
    for layer in (0, 1):  # query and value read the same hidden states
        q, v = (stats[f"encoder/layers_{layer}/attention/mha/{n}"] for n in ("query", "value"))
        assert q.num_tokens == v.num_tokens == 2 * 15
        np.testing.assert_array_equal(q.singular_values, v.singular_values)
    ranks = eva_allocate(stats, rank=4, rho=2.0, sites=targets)
    assert sum(ranks.values()) == 16 and max(ranks.values()) <= 8
    plan = eva_plan(sites, ranks)
    assert plan.use["params"] == sum(r * (16 + 16) for r in ranks.values())
    adapted = eva_init(apply_plan(model, plan), stats, ranks)
    for b in batches:
        np.testing.assert_array_equal(np.asarray(forward_bert(adapted, b)),
                                      np.asarray(forward_bert(model, b)))
    # an adapted model reads the same statistics (B = 0 leaves every hidden state as it was)
    again = eva_statistics(adapted, batches, targets[:1], forward=forward_bert)
    np.testing.assert_allclose(again[targets[0].path].singular_values,
                               stats[targets[0].path].singular_values, rtol=1e-6)


def test_bert_site_errors(bert):
    model, batches, _, _ = bert
    with pytest.raises(ValueError, match="'classifier': token mask of shape"):
        eva_statistics(model, batches, ["classifier"], forward=forward_bert)
    with pytest.raises(ValueError, match="'embeddings/word' is a Embed"):
        eva_statistics(model, batches, ["embeddings/word"], forward=forward_bert)
    with pytest.raises(ValueError, match="'nope' is not a submodule"):
        eva_statistics(model, batches, ["nope"], forward=forward_bert)
    with pytest.raises(ValueError, match="no batches"):
        eva_statistics(model, [], ["classifier"], forward=forward_bert)
