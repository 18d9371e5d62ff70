"""The evaluation battery's pure parts: k-NN, logistic regression and few-shot samples, each
against a reference (a direct float64 implementation, scikit-learn)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from featstore.errors import UsageError
from probe import fewshot
from probe.methods import heads as H
from probe.methods import knn, logreg
from probe.methods.logistic import run_logreg
from probe.methods.neighbours import run_knn
from tests.test_probe import one_thread  # noqa: F401 (autouse fixture: one thread for small problems)


def blobs(n: int, dim: int, classes: int, seed: int, sep: float = 0.6, offset: float = 0.0):
    """Gaussian classes with random means (continuous data: exact similarity ties have probability 0)."""
    rng = np.random.default_rng(1000 + classes)
    means = rng.normal(size=(classes, dim)) * sep
    r = np.random.default_rng(seed)
    y = r.integers(0, classes, n)
    x = means[y] + r.normal(size=(n, dim)) + offset
    return x.astype(np.float32), y.astype(np.int64)


# ----------------------------------------------------------------------------------------- k-NN


def knn_reference(train_x, train_y, query_x, k, num_classes, temperature, weights):
    """The rule written out in float64: full similarity matrix, full sort, one class-vote sum per row."""
    a = train_x.astype(np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    q = query_x.astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sim = q @ a.T
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(q), num_classes))
    for i in range(len(q)):
        w = np.exp(sim[i, order[i]] / temperature) if weights == "exp" else np.ones(k)
        np.add.at(votes[i], train_y[order[i]], w)
    return votes, np.sort(sim, axis=1)[:, ::-1]


def _knn_torch(train_x, train_y, query_x, ks, classes, device="cpu", **kw):
    a = knn.l2_normalize(torch.from_numpy(train_x).to(device))
    q = knn.l2_normalize(torch.from_numpy(query_x).to(device))
    return knn.predict(a, torch.from_numpy(train_y).to(device), q, ks, classes, **kw)


_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize(("weights", "temperature"), [("exp", 0.07), ("exp", 0.005), ("uniform", 0.07)])
def test_knn_equals_float64_reference(weights, temperature, device):
    """A small temperature too: exp(1 / 0.005) overflows float32, which made every close vote inf
    (ties to the smallest class) before the votes were taken relative to the nearest neighbour."""
    classes = 7
    train_x, train_y = blobs(600, 16, classes, seed=0, offset=0.3)
    query_x, query_y = blobs(250, 16, classes, seed=1, offset=0.3)
    ks = (1, 5, 20, 100)
    # chunk_elements forces several chunks of query rows (one chunk would hide a chunking bug)
    pred = _knn_torch(train_x, train_y, query_x, ks, classes, device, temperature=temperature, weights=weights, chunk_elements=600 * 37)
    assert pred.top1.shape == (4, 250) and pred.top5.shape == (4, 250, 5)
    compared = 0
    for j, k in enumerate(ks):
        votes, sorted_sim = knn_reference(train_x, train_y, query_x, k, classes, temperature, weights)
        top = np.sort(votes, axis=1)[:, ::-1]
        # "ties aside": rows whose k-th/(k+1)-th neighbours or top two vote totals are within rounding
        clear = (sorted_sim[:, k - 1] - sorted_sim[:, k] > 1e-6) & (top[:, 0] - top[:, 1] > 1e-5 * top[:, 0])
        assert clear.mean() > 0.8
        expected = votes.argmax(1)
        np.testing.assert_array_equal(pred.top1[j][clear], expected[clear])
        # the top-5 lists rank classes by vote: their votes are non-increasing and start at the max
        picked = np.take_along_axis(votes, pred.top5[j], axis=1)
        assert (np.diff(picked, axis=1) <= 1e-6 * top[:, :1]).all()
        compared += int(clear.sum())
    assert compared > 800
    acc = pred.accuracy(query_y)
    np.testing.assert_allclose(acc["top1"], [(pred.top1[j] == query_y).mean() * 100 for j in range(4)])
    assert acc["top1"][2] > 60  # the classes are separable enough for k-NN to work at all


def test_knn_uniform_equals_sklearn():
    from sklearn.neighbors import KNeighborsClassifier

    classes = 10
    train_x, train_y = blobs(500, 12, classes, seed=2, sep=0.5, offset=0.2)
    query_x, _ = blobs(200, 12, classes, seed=3, sep=0.5, offset=0.2)
    ks = (10, 20, 100, 200)
    pred = _knn_torch(train_x, train_y, query_x, ks, classes, weights="uniform", chunk_elements=500 * 64)
    for j, k in enumerate(ks):
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(train_x, train_y).predict(query_x)
        # uniform votes are integers, so vote ties are exact and both break them to the smaller class
        np.testing.assert_array_equal(pred.top1[j], ref)


def test_knn_k_larger_than_train_uses_every_row_and_ties_go_to_smaller_class():
    train_x = np.array([[1, 0], [0, 1], [1, 1], [-1, 0.2]], np.float32)
    train_y = np.array([2, 0, 1, 1])
    query_x = np.array([[1, 0.1], [0.1, 1]], np.float32)
    pred = _knn_torch(train_x, train_y, query_x, (1, 2, 50), 3, weights="uniform")
    assert pred.ks == (1, 2, 50)
    np.testing.assert_array_equal(pred.top1[0], [2, 0])  # the nearest row's class
    np.testing.assert_array_equal(pred.top1[1], [1, 0])  # k=2: one vote each for 2 and 1 → 1; 0 and 1 → 0
    np.testing.assert_array_equal(pred.top1[2], [1, 1])  # all 4 rows: class 1 has two votes
    assert pred.top5.shape == (3, 2, 3)  # 3 classes: the "top-5" lists all 3


def test_knn_settings_are_checked():
    for bad in ([0, 10], [2.5], []):
        with pytest.raises(UsageError):
            knn.check_settings(bad, 0.07, "exp")
    with pytest.raises(UsageError):
        knn.check_settings([10], 0.0, "exp")
    with pytest.raises(UsageError):
        knn.check_settings([10], 0.07, "distance")
    assert knn.check_settings([200, 10, 20, 10], 0.07, "uniform") == (10, 20, 200)


# ------------------------------------------------------------------------ logistic regression


def _standardized(train_x, *others):
    t = torch.from_numpy(train_x)
    stats = H.standardize_stats(t)
    return [H.prepare(torch.from_numpy(a), "standardize", torch.float32, stats) for a in (train_x, *others)]


@pytest.mark.parametrize("dtype, tol, obj_rtol", [(torch.float32, logreg.DEFAULT_TOL, 2e-6), (torch.float64, 1e-6, 1e-9)])
def test_logreg_matches_sklearn_at_every_C(dtype, tol, obj_rtol):
    """float32 at the default tolerance (what probe fit runs) and float64 at a tight one (the
    solver itself): each C's test accuracy within 0.3 pt of scikit-learn's, and the objective
    at our solution no higher than at scikit-learn's (to float rounding)."""
    from sklearn.linear_model import LogisticRegression

    classes = 6
    train_x, train_y = blobs(3000, 24, classes, seed=4, sep=0.35)
    test_x, test_y = blobs(2000, 24, classes, seed=5, sep=0.35)
    train_x *= np.linspace(0.1, 5, 24, dtype=np.float32)  # scales that standardizing undoes
    test_x *= np.linspace(0.1, 5, 24, dtype=np.float32)
    xs, xt = _standardized(train_x, test_x)
    x64 = xs.numpy().astype(np.float64)
    Cs = np.logspace(-4, 2, 7)
    path = logreg.fit_path(xs.to(dtype), torch.from_numpy(train_y), Cs, classes, tol=tol)
    top1, top5 = path.predict(xt.to(dtype))
    assert top1.shape == (7, 2000) and top5.shape == (7, 2000, 5)
    np.testing.assert_array_equal(top1, top5[:, :, 0])
    assert all(path.converged) and path.n_iter[0] > 0
    assert_converged_means_tolerance(path, xs.to(dtype), torch.from_numpy(train_y), tol)
    accs = []
    for i, C in enumerate(Cs):
        ref = LogisticRegression(C=float(C), max_iter=1000, tol=tol).fit(x64, train_y)
        ours = 100 * (top1[i] == test_y).mean()
        theirs = 100 * ref.score(xt.numpy(), test_y)
        assert abs(ours - theirs) <= 0.3, (C, ours, theirs)
        obj_ref = logreg.sklearn_objective(x64, train_y, ref.coef_.T, ref.intercept_, C)
        obj_ours = logreg.sklearn_objective(x64, train_y, path.weight[i].double().numpy(), path.bias[i].double().numpy(), C)
        assert obj_ours == pytest.approx(path.objective[i], rel=1e-5)
        assert obj_ours <= obj_ref * (1 + obj_rtol), (C, obj_ours, obj_ref)
        accs.append(ours)
    assert max(accs) > 60 and accs[0] < max(accs) - 3  # the grid spans under- to well-fitted


def test_logreg_default_tolerance_path_and_refit_from_init():
    classes = 4
    x, y = blobs(1500, 10, classes, seed=6, sep=0.5)
    (xs,) = _standardized(x)
    yt = torch.from_numpy(y)
    path = logreg.fit_path(xs, yt, [1e-3, 1e-2, 1e-1], classes)
    assert path.Cs == (1e-3, 1e-2, 1e-1)
    assert all(g <= logreg.DEFAULT_TOL for g in path.grad_max)
    assert_converged_means_tolerance(path, xs, yt, logreg.DEFAULT_TOL)
    assert path.objective == sorted(path.objective)  # a larger C weighs the summed loss more
    # the same C solved from the path's solution (a refit's start) needs few or no iterations
    again = logreg.fit_path(xs, yt, [1e-1], classes, init=(path.weight[2], path.bias[2]))
    assert again.n_iter[0] <= 2
    assert_converged_means_tolerance(again, xs, yt, logreg.DEFAULT_TOL)
    assert again.objective[0] == pytest.approx(path.objective[2], rel=1e-4)
    capped = logreg.fit_path(xs, yt, [1e2], classes, max_iter=2)
    assert capped.n_iter == [2] and capped.converged == [False]


def test_logreg_with_classes_absent_from_the_training_rows():
    """num_classes larger than the labels seen (a few-shot or filtered split): the absent classes'
    intercepts go to −∞ within the intercept's Newton steps, the solves converge, and the model is
    scikit-learn's fitted on the present classes."""
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(900, 10, 3, seed=9, sep=0.6)
    (xs,) = _standardized(x)
    path = logreg.fit_path(xs, torch.from_numpy(y), [1e-2, 1.0], 5)
    assert all(path.converged) and max(path.grad_max) <= logreg.DEFAULT_TOL
    assert_converged_means_tolerance(path, xs, torch.from_numpy(y), logreg.DEFAULT_TOL)
    assert bool((path.bias[:, 3:] < path.bias[:, :3].min() - 8).all())
    top1, _ = path.predict(xs)
    assert top1.max() <= 2
    for i, C in enumerate(path.Cs):
        ref = LogisticRegression(C=C, max_iter=1000).fit(xs.numpy().astype(np.float64), y)
        assert (ref.predict(xs.numpy()) == top1[i]).mean() >= 0.995
        obj_ref = logreg.sklearn_objective(xs.numpy(), y, ref.coef_.T, ref.intercept_, C)
        obj_ours = logreg.sklearn_objective(xs.numpy(), y, path.weight[i, :, :3].numpy(), path.bias[i, :3].numpy(), C)
        assert obj_ours == pytest.approx(obj_ref, rel=1e-4)


def float64_gradient_max(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, C: float) -> float:
    """The largest component of the scaled objective's gradient at (W, b), by autograd in float64
    (scikit-learn's objective: the binary one when two classes are present, W's columns ±v/2)."""
    x64 = x.double()
    w = w.detach().double().requires_grad_(True)
    b = b.detach().double().requires_grad_(True)
    n = x.shape[0]
    present = int((torch.bincount(y, minlength=w.shape[1]) > 0).sum())
    lam = (2.0 if present == 2 else 1.0) / (C * n)
    loss = torch.nn.functional.cross_entropy(x64 @ w + b, y) + 0.5 * lam * w.square().sum()
    loss.backward()
    return max(float(w.grad.abs().max()), float(b.grad.abs().max()))


def assert_converged_means_tolerance(path: logreg.LogregPath, x: torch.Tensor, y: torch.Tensor, tol: float) -> None:
    """Wherever a solve says it converged, the float64 gradient at what it returned meets ``tol``,
    and the reported gradient is that one (to float32 rounding of a mean)."""
    for i, C in enumerate(path.Cs):
        true = float64_gradient_max(x, y, path.weight[i], path.bias[i], C)
        assert abs(true - path.grad_max[i]) <= 0.1 * tol + 1e-3 * true, (C, true, path.grad_max[i])
        if path.converged[i]:
            assert true <= tol * (1 + 1e-3), (C, true, tol)


def test_logreg_refit_from_a_path_solution_missing_a_class():
    """A class absent from the path's rows but present in the refit's (train + select): the
    refit starts where that class's intercept is ≈ −15 and its probability ≈ 0. Its Newton step
    used to be ~10⁷ and never taken, the first L-BFGS step |W| ≈ 350, and every line-search
    candidate's intercept solve started from the last rejected one: one iteration, "converged",
    17 pt below scikit-learn. Now: scikit-learn's model, gradient within tolerance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    means = np.random.default_rng(1005).normal(size=(5, 16)) * 0.6
    r = np.random.default_rng(0)
    y = r.integers(0, 5, 4000)
    x = (means[y] + r.normal(size=(4000, 16))).astype(np.float32)
    rows = np.arange(4000)
    train = (rows < 2000) & (y != 4)
    select = (rows >= 2000) & (rows < 3000)
    report = rows >= 3000
    roles = {"train": train, "select": select, "report": report}
    xr = {k: torch.from_numpy(x[m]) for k, m in roles.items()}
    yr = {k: torch.from_numpy(y[m]) for k, m in roles.items()}
    res = run_logreg(xr, yr, 5, (1e-2, 1.0, 100.0), logreg.DEFAULT_TOL, 1000, refit=True)
    chosen = res.selected
    assert chosen.settings["refit"] and chosen.extra["converged"] and chosen.extra["iterations"] > 1
    C = chosen.settings["C"]
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(x[train | select], y[train | select])
    assert abs(chosen.metrics["report"]["top1"] - 100 * ref.score(x[report], y[report])) <= 0.3
    # the refit itself, from the path's solution, its gradient checked in float64
    (xs,) = _standardized(x[train | select])
    ys = torch.from_numpy(y[train | select])
    (xp,) = _standardized(x[train])
    path = logreg.fit_path(xp, torch.from_numpy(y[train]), [C], 5)
    assert float(path.bias[0, 4]) < float(path.bias[0, :4].min()) - 8
    refit = logreg.fit_path(xs, ys, [C], 5, init=(path.weight[0], path.bias[0]))
    assert refit.converged == [True]
    assert_converged_means_tolerance(refit, xs, ys, logreg.DEFAULT_TOL)
    obj_ref = logreg.sklearn_objective(xs.numpy(), y[train | select], ref[-1].coef_.T, ref[-1].intercept_, C)
    assert refit.objective[0] == pytest.approx(obj_ref, rel=1e-5)


def _correlated(n: int, sep: float, mix: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 Gaussian classes in 64 dimensions, then a shared offset and a random mixing of the
    features (strongly correlated columns, standardised)."""
    means = np.random.default_rng(1010).normal(size=(10, 64)) * sep
    r = np.random.default_rng(seed)
    y = r.integers(0, 10, n)
    x = means[y] + r.normal(size=(n, 64))
    x = x + mix * r.normal(size=(n, 1)) + mix * x @ r.normal(size=(64, 64)) / 8
    (xs,) = _standardized(x.astype(np.float32))
    return xs, torch.from_numpy(y)


def test_logreg_converged_means_the_gradient_meets_tol():
    """``converged`` is grad ≤ tol at the returned point, recomputed here in float64, and the
    reported gradient is the returned point's. Correlated features with well-separated classes: a
    C where float32 could not tell the objective's decrease used to stop after one iteration,
    "converged" at 2.4× the tolerance; at tol 1e-6, a line-search failure reported the gradient
    of another pass than the returned intercept's (4.3e-6 reported, 1.1e-6 true)."""
    xs, yt = _correlated(2000, sep=3.0, mix=5.0, seed=30)
    path = logreg.fit_path(xs, yt, np.logspace(-6, 5, 45), 10)
    assert all(path.converged)
    assert_converged_means_tolerance(path, xs, yt, logreg.DEFAULT_TOL)
    xs, yt = _correlated(5000, sep=0.3, mix=2.0, seed=0)
    tight = logreg.fit_path(xs, yt, np.logspace(-6, 5, 23)[:3], 10, tol=1e-6)
    assert_converged_means_tolerance(tight, xs, yt, 1e-6)


@pytest.mark.parametrize("classes, labels", [(2, (0, 1)), (5, (1, 3))])
def test_logreg_two_classes_is_sklearns_binary_model(classes, labels):
    """Two classes in the rows (K = 2, or two of K = 5 present): scikit-learn fits its binary
    model, whose penalty ½‖v‖² is twice the symmetric softmax's ¼‖v‖², so the softmax at C used
    to be scikit-learn's at 2C (68.3 vs 60.7 pt at C = 3.16e-5). Now: its accuracy within 0.3 pt
    and its objective at every C, and a float64 gradient within tolerance."""
    from sklearn.linear_model import LogisticRegression

    means = np.random.default_rng(1002).normal(size=(2, 32)) * 0.15
    data = []
    for seed in (3, 4):
        r = np.random.default_rng(seed)
        y01 = r.integers(0, 2, 3000)
        data.append(((means[y01] + r.normal(size=(3000, 32))).astype(np.float32), np.asarray(labels)[y01]))
    (train_x, train_y), (test_x, test_y) = data
    xs, xt = _standardized(train_x, test_x)
    x64 = xs.numpy().astype(np.float64)
    yt = torch.from_numpy(train_y)
    Cs = [1e-5, 3.16e-5, 1e-4, 1e-2, 1.0]
    path = logreg.fit_path(xs, yt, Cs, classes)
    assert all(path.converged)
    assert_converged_means_tolerance(path, xs, yt, logreg.DEFAULT_TOL)
    top1, _ = path.predict(xt)
    cols = list(labels)
    for i, C in enumerate(Cs):
        ref = LogisticRegression(C=C, max_iter=1000, tol=1e-8).fit(x64, train_y)
        ours = 100 * (top1[i] == test_y).mean()
        assert abs(ours - 100 * ref.score(xt.numpy(), test_y)) <= 0.3, (C, ours)
        obj_ref = logreg.sklearn_objective(x64, np.searchsorted(labels, train_y), ref.coef_.T, ref.intercept_, C)
        obj_ours = logreg.sklearn_objective(
            x64, np.searchsorted(labels, train_y), path.weight[i][:, cols].double().numpy(), path.bias[i][cols].double().numpy(), C
        )
        # (the absent classes' probabilities are ≈ 1e-6, not 0: they move the full objective by ~2e-5)
        assert path.objective[i] == pytest.approx(obj_ours, rel=1e-5 if classes == 2 else 1e-4)
        assert obj_ours == pytest.approx(obj_ref, rel=1e-6), C


def test_kronecker_preconditioner_row_subsample_past_float32_integers():
    """n − 1 = 2²⁴ + 3 rounds up in float32: a float linspace of row indices indexed past the end."""
    n = (1 << 24) + 4
    x = torch.zeros(n, 1)
    x[-1] = 1.0
    x[::3] = -1.0
    prec = logreg.KroneckerPreconditioner(x, rows=4)  # rows 0, ⌊(n−1)/3⌋, ⌊2(n−1)/3⌋, n − 1
    picked = x[torch.tensor([0, (n - 1) // 3, 2 * (n - 1) // 3, n - 1])]
    assert float(prec.s.max()) == pytest.approx(float(picked.var(unbiased=False)), rel=1e-6)


def test_logreg_path_with_two_C_of_the_same_log():
    """1e-3 and its next float are distinct C with one log: the extrapolation divided by zero.
    Now it uses one point per log, and the path solves every C."""
    Cs = (1e-4, 1e-3, 1e-3 * (1 + 2.3e-16), 1e-2, 1e-1)
    assert Cs[1] != Cs[2] and math.log(Cs[1]) == math.log(Cs[2])
    line = lambda c: torch.full((3, 2), math.log(c), dtype=torch.float64)  # noqa: E731
    sols = [line(c) for c in Cs[:4]]
    torch.testing.assert_close(logreg._extrapolate(Cs, 4, sols), line(0.1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logreg._extrapolate(Cs, 3, sols[:3]), line(1e-2), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logreg._extrapolate(Cs, 2, sols[:2]), sols[1])  # at the last C's log: no prediction
    x, y = blobs(1500, 12, 4, seed=4, sep=0.35)
    (xs,) = _standardized(x)
    yt = torch.from_numpy(y)
    path = logreg.fit_path(xs, yt, Cs, 4)
    assert all(path.converged)
    assert_converged_means_tolerance(path, xs, yt, logreg.DEFAULT_TOL)
    assert path.objective[2] == pytest.approx(path.objective[1], rel=1e-6)


def test_logreg_many_classes_diagonal_class_statistics():
    """More than FULL_CLASSES classes: the intercept's Newton steps and the preconditioner's class
    factor use only the diagonal of E[p pᵀ] (the K × K sum, n·K² per step, cost more than the
    gradient GEMM at K = 1000, D = 768), and the path is still scikit-learn's model."""
    from sklearn.linear_model import LogisticRegression

    classes = logreg.FULL_CLASSES + 16
    x, y = blobs(4000, 12, classes, seed=2, sep=1.5)
    (xs,) = _standardized(x)
    yt = torch.from_numpy(y)
    profile = logreg.BiasProfile(xs, yt, classes, tol=1e-4)
    w = torch.from_numpy(np.random.default_rng(0).normal(size=(12, classes)).astype(np.float32)) * 0.1
    _, _, db, b, factor = profile(w, torch.zeros(classes))
    assert factor.shape == (classes,) and float(db.abs().max()) <= 1e-5
    p = torch.softmax(xs.double() @ w.double() + b.double(), 1)
    torch.testing.assert_close(factor.double(), p.mean(0) - p.square().mean(0), rtol=0, atol=1e-6)
    Cs = [1e-2, 1.0]
    path = logreg.fit_path(xs, yt, Cs, classes)
    assert all(path.converged)
    assert_converged_means_tolerance(path, xs, yt, logreg.DEFAULT_TOL)
    x64 = xs.numpy().astype(np.float64)
    top1, _ = path.predict(xs)
    for i, C in enumerate(Cs):  # scikit-learn at the same tolerance: our objective no higher
        ref = LogisticRegression(C=C, max_iter=1000).fit(x64, y)
        obj_ref = logreg.sklearn_objective(x64, y, ref.coef_.T, ref.intercept_, C)
        assert path.objective[i] <= obj_ref * (1 + 2e-6), (C, path.objective[i], obj_ref)
        assert (top1[i] == ref.predict(x64)).mean() >= 0.995


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_logreg_path_on_cuda_matches_cpu():
    """The same path solved on the GPU: every C converged, the objective within float32 rounding
    of the CPU solve's and of scikit-learn's scale, and the same predictions on ≥ 99.5% of rows."""
    classes = 6
    x, y = blobs(4000, 32, classes, seed=10, sep=0.3)
    (xs,) = _standardized(x)
    Cs = np.logspace(-4, 2, 7)
    cpu = logreg.fit_path(xs, torch.from_numpy(y), Cs, classes)
    gpu = logreg.fit_path(xs.cuda(), torch.from_numpy(y).cuda(), Cs, classes)
    assert all(gpu.converged) and max(gpu.grad_max) <= logreg.DEFAULT_TOL
    for i, C in enumerate(Cs):
        mine = logreg.sklearn_objective(xs.numpy(), y, gpu.weight[i].cpu().numpy(), gpu.bias[i].cpu().numpy(), C)
        ref = logreg.sklearn_objective(xs.numpy(), y, cpu.weight[i].numpy(), cpu.bias[i].numpy(), C)
        assert mine == pytest.approx(ref, rel=1e-4)
    assert (gpu.predict(xs.cuda())[0] == cpu.predict(xs)[0]).mean() >= 0.995


def test_logreg_settings_are_checked():
    with pytest.raises(UsageError):
        logreg.check_settings([0.0, 1.0], 1e-4, 100)
    with pytest.raises(UsageError):
        logreg.check_settings([1.0], 0.0, 100)
    with pytest.raises(UsageError):
        logreg.check_settings([1.0], 1e-4, 0)


def _ce64(x, y, w, b):
    """mean cross-entropy in float64 by autograd-able torch ops (the direct definition)."""
    return torch.nn.functional.cross_entropy(x.double() @ w + b, y)


@pytest.mark.parametrize("keep_logits", [True, False])
def test_bias_profile_is_the_best_intercept_and_its_gradient(keep_logits):
    """One pass of the profiled objective against float64 autograd: b* minimises the mean
    cross-entropy over the intercept (its gradient below the inner tolerance, and scipy's
    minimiser agrees), and CE, dW, db and the class factor E[diag p − p pᵀ] at (W, b*) are the
    direct ones. Imbalanced classes, so b* is far from the start b = 0; chunks smaller than the
    rows; with the logits kept and recomputed per Newton step."""
    from scipy.optimize import minimize

    classes = 5
    x, y = blobs(1200, 16, classes, seed=7, sep=0.4)
    y = np.where(np.arange(1200) % 3 == 0, 0, y)  # class 0 three times as frequent
    (xs,) = _standardized(x)
    yt = torch.from_numpy(y)
    w = torch.from_numpy(np.random.default_rng(1).normal(scale=0.3, size=(16, classes)).astype(np.float32))
    profile = logreg.BiasProfile(xs, yt, classes, tol=1e-4)
    profile.step = 250  # five chunks, the last one short
    profile.keep = keep_logits
    ce, gw, gb, b, factor = profile(w, torch.zeros(classes))
    assert float(gb.abs().max()) <= 1e-5

    w64 = w.double()
    ref = minimize(lambda v: float(_ce64(xs, yt, w64, torch.from_numpy(v))), np.zeros(classes), method="BFGS", options={"gtol": 1e-10})
    shift = float((b.double() - torch.from_numpy(ref.x)).mean())  # b is defined up to a common shift
    torch.testing.assert_close(b.double() - shift, torch.from_numpy(ref.x), rtol=0, atol=2e-4)

    w_ = w64.clone().requires_grad_(True)
    b_ = b.double().clone().requires_grad_(True)
    loss = _ce64(xs, yt, w_, b_)
    loss.backward()
    assert ce == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(gw.double(), w_.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(gb.double(), b_.grad, rtol=0, atol=1e-6)
    p = torch.softmax(xs.double() @ w64 + b.double(), 1)
    direct = torch.diag(p.mean(0)) - p.t() @ p / len(p)
    torch.testing.assert_close(factor.double(), direct, rtol=0, atol=1e-6)


def test_kronecker_preconditioner_inverts_the_hessian_at_zero():
    """At W = 0 every row has the same softmax covariance A (p = the class frequencies, b* their
    log), so the Hessian of the profiled objective is exactly Σ ⊗ A + λI (Σ the features'
    covariance; centred features do not couple W to b): the preconditioner built from
    all rows undoes a float64 autograd Hessian-vector product (directions with zero class sum,
    the only ones the objective has). From a row subsample it is close, not exact."""
    classes, dim, lam = 4, 12, 0.05
    x, y = blobs(900, dim, classes, seed=8, sep=0.5)
    x = x @ np.random.default_rng(3).normal(size=(dim, dim)).astype(np.float32)  # correlated features
    xt = torch.from_numpy(x - x.mean(0))  # centred: then the intercept does not couple to W at W = 0
    yt = torch.from_numpy(y)
    profile = logreg.BiasProfile(xt, yt, classes, tol=1e-4)
    _, _, _, b, factor = profile(torch.zeros(dim, classes), torch.zeros(classes))
    prec = logreg.KroneckerPreconditioner(xt, rows=len(x))
    prec.lam = lam
    prec.set_class_factor(factor)
    prior = torch.from_numpy(np.bincount(y, minlength=classes) / len(y))
    torch.testing.assert_close(factor.double(), torch.diag(prior) - torch.outer(prior, prior), rtol=0, atol=1e-6)

    def objective(w):
        return _ce64(xt, yt, w, b.double()) + 0.5 * lam * w.square().sum()

    rng = np.random.default_rng(2)
    v = torch.from_numpy(rng.normal(size=(dim, classes)))
    v -= v.mean(1, keepdim=True)  # zero class sum
    _, hv = torch.autograd.functional.hvp(objective, torch.zeros(dim, classes, dtype=torch.float64), v)
    torch.testing.assert_close(prec(hv.float()).double(), v, rtol=0, atol=1e-5 * float(v.abs().max()))
    sub = logreg.KroneckerPreconditioner(xt, rows=300)
    sub.lam = lam
    sub.set_class_factor(factor)
    err = float((sub(hv.float()).double() - v).norm() / v.norm())
    assert 1e-4 < err < 1.0, err  # an approximation (it is only a preconditioner), not the exact inverse


def test_path_predictions():
    """_extrapolate is exact for a path quadratic in log C (three known points) and linear with two;
    _tangent steps along λ (H + λI)⁻¹ W with the preconditioner's Hessian."""
    Cs = (0.01, 0.1, 1.0, 10.0)
    curve = lambda c: torch.tensor([[1.0 + 2.0 * math.log(c) - 0.5 * math.log(c) ** 2]])  # noqa: E731
    torch.testing.assert_close(logreg._extrapolate(Cs, 3, [curve(c) for c in Cs[:3]]), curve(10.0), rtol=1e-6, atol=1e-6)
    line = lambda c: torch.tensor([[3.0 - math.log(c)]])  # noqa: E731
    torch.testing.assert_close(logreg._extrapolate(Cs, 2, [line(c) for c in Cs[:2]]), line(1.0), rtol=1e-6, atol=1e-6)

    class Scale:  # a preconditioner that is (2 + λ)⁻¹: H = 2I
        lam = 0.0

        def set_class_factor(self, factor):
            pass

        def __call__(self, v):
            return v / (2 + self.lam)

    w = torch.ones(3, 2)
    torch.testing.assert_close(logreg._tangent(w, 0.5, 0.25, None, Scale()), w * (1 + 0.5 * 0.25 / 2.25))


def test_lbfgs_minimizes_a_quadratic_to_tolerance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 30))
    hess = torch.from_numpy(a @ a.T + 30 * np.eye(30))
    target = torch.from_numpy(rng.normal(size=30))

    def fg(p):
        r = p - target
        return float(0.5 * r @ hess @ r), hess @ r

    sol, iters, g_max = logreg.lbfgs(fg, torch.zeros(30, dtype=torch.float64), tol=1e-6, max_iter=500)
    assert g_max <= 1e-6 and 0 < iters < 200
    torch.testing.assert_close(sol, target, rtol=0, atol=1e-7)  # |x - x*| <= |g| / 30, the smallest curvature


def test_lbfgs_below_float_resolution_gives_up_unconverged():
    """A tolerance the arithmetic cannot resolve (f rounded to float32 around 1e3, the gradient
    noisy at 1e-6): the solve stops after a run of iterations without progress, returns the
    gradient it has, above tol (so fit_path says not converged), and does not grind to the cap.
    On the way there the slope-based acceptance keeps it going well below where f stops telling."""
    rng = np.random.default_rng(1)
    target = torch.from_numpy(rng.normal(size=20))
    noise = torch.Generator().manual_seed(0)

    def fg(p):
        r = p - target
        f = float(torch.tensor(1e3 + 0.5 * float(r @ r), dtype=torch.float32))  # resolves ~6e-5
        return f, r + 1e-6 * torch.randn(20, generator=noise, dtype=torch.float64)

    sol, iters, g_max = logreg.lbfgs(fg, torch.zeros(20, dtype=torch.float64), tol=1e-9, max_iter=500)
    assert g_max > 1e-9 and iters < 100
    assert float((sol - target).abs().max()) < 1e-4  # far below f's resolution in |r|: ~1e-2


# ------------------------------------------------------------------------------------ few-shot


def test_fewshot_sample_is_class_balanced_nested_and_seeded():
    labels = np.repeat(np.arange(5), [30, 12, 3, 40, 25])
    np.random.default_rng(0).shuffle(labels)
    usable = np.ones(len(labels), bool)
    usable[::7] = False
    rows = {s: fewshot.sample(labels, usable, s, seed=3) for s in (1, 5, 10)}
    for s, r in rows.items():
        assert usable[r].all() and (np.diff(r) > 0).all()
        counts = np.bincount(labels[r], minlength=5)
        expected = np.minimum(s, np.bincount(labels[usable], minlength=5))
        np.testing.assert_array_equal(counts, expected)
    assert set(rows[1]) <= set(rows[5]) <= set(rows[10])  # a larger sample extends a smaller one
    np.testing.assert_array_equal(rows[5], fewshot.sample(labels, usable, 5, seed=3))
    assert not np.array_equal(rows[5], fewshot.sample(labels, usable, 5, seed=4))
    have = np.bincount(labels[usable], minlength=5)
    assert fewshot.shortfall(labels, rows[10], 10) == {c: int(have[c]) for c in range(5) if have[c] < 10}
    assert fewshot.shortfall(labels, rows[10], 10)  # the data above has classes short of 10
    none = usable & (labels != 2)  # class 2 has no usable row: named too (was left out of the warning)
    assert fewshot.shortfall(labels, fewshot.sample(labels, none, 5, seed=3), 5)[2] == 0
    # a row another store cannot use is replaced by the next row of its class; the rest stay
    fewer = usable.copy()
    fewer[rows[5][0]] = False
    other = fewshot.sample(labels, fewer, 5, seed=3)
    assert len(set(rows[5]) - set(other)) == 1 and len(other) == len(rows[5])


def test_parse_ints():
    assert fewshot.parse_ints("25,1,5,5", what="shots", option="--shots", minimum=1) == (1, 5, 25)
    assert fewshot.parse_ints([0, 3], what="seeds", option="--seeds") == (0, 3)
    for bad in ("1,x", "0", "2.5", ""):
        with pytest.raises(UsageError):
            fewshot.parse_ints(bad, what="shots", option="--shots", minimum=1)


# -------------------------------------------------------------- methods on one store × view


def _roles(seed=7, classes=5):
    out_x, out_y = {}, {}
    for i, (role, n) in enumerate((("train", 900), ("select", 300), ("report", 400))):
        x, y = blobs(n, 12, classes, seed=seed + i, sep=0.45, offset=0.5)
        out_x[role], out_y[role] = torch.from_numpy(x), torch.from_numpy(y)
    return out_x, out_y


def _scrambled(y):
    y = dict(y)
    y["report"] = torch.from_numpy(np.random.default_rng(0).permutation(y["report"].numpy()))
    return y


def test_knn_method_selects_on_the_selection_split_and_reports_every_k():
    x, y = _roles()
    res = run_knn(x, y, 5, (1, 10, 50), 0.07, "exp")
    assert [c.settings["k"] for c in res.configs] == [1, 10, 50]
    assert sum(c.selected for c in res.configs) == 1 and sum(c.best_report for c in res.configs) == 1
    val = [c.metrics["select"]["top1"] for c in res.configs]
    assert res.selected.metrics["select"]["top1"] == max(val)
    assert all("train" not in c.metrics for c in res.configs)  # a row is its own nearest neighbour: no train accuracy
    top1, top5 = res.predictions["report"]
    assert top1.shape == (400,) and top5.shape == (400, 5)
    assert res.selected.metrics["report"]["top1"] == pytest.approx((top1 == y["report"].numpy()).mean() * 100)
    scrambled = run_knn(x, _scrambled(y), 5, (1, 10, 50), 0.07, "exp")
    assert scrambled.selected.settings == res.selected.settings


def test_logreg_method_selects_then_refits_on_train_and_selection_rows():
    x, y = _roles()
    Cs = (1e-4, 1e-2, 1.0)
    res = run_logreg(x, y, 5, Cs, logreg.DEFAULT_TOL, 1000, refit=True)
    path = [c for c in res.configs if not c.settings["refit"]]
    assert [c.settings["C"] for c in path] == list(Cs) and not any(c.selected for c in path)
    chosen = max(path, key=lambda c: (c.metrics["select"]["top1"], -c.settings["C"]))
    final = res.selected
    assert final.settings == {"C": chosen.settings["C"], "refit": True} and final is res.configs[-1]
    assert "select" not in final.metrics and "report" in final.metrics  # the selection rows trained the refit
    # the refit is the scikit-learn fit on train + val at that C, standardised on train + val
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    both = np.concatenate([x["train"].numpy(), x["select"].numpy()])
    both_y = np.concatenate([y["train"].numpy(), y["select"].numpy()])
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=final.settings["C"], max_iter=1000)).fit(both, both_y)
    assert final.metrics["report"]["top1"] == pytest.approx(100 * ref.score(x["report"].numpy(), y["report"].numpy()), abs=0.3)
    assert res.predictions["report"][0].shape == (400,)
    scrambled = run_logreg(x, _scrambled(y), 5, Cs, logreg.DEFAULT_TOL, 1000, refit=True)
    assert scrambled.selected.settings == final.settings
    no_refit = run_logreg(x, y, 5, Cs, logreg.DEFAULT_TOL, 1000, refit=False)
    assert len(no_refit.configs) == 3 and no_refit.selected.settings == {"C": chosen.settings["C"], "refit": False}


# ------------------------------------------------------------------------------------ protocol


def test_default_protocol_hash_is_unchanged_by_the_battery():
    from probe import Protocol

    # the default (linear only, every row, one seed) hash: a battery field must never enter a
    # default run's record (update only on a deliberate protocol change). It was 31bde9ae39a5e9f4
    # until #27 added ``refit`` (the linear heads refit on train + holdout change what is reported)
    assert Protocol().hash == "4b098dff815f0f20"
    assert Protocol(methods="linear", seeds=[0]).hash == "4b098dff815f0f20"
    record = Protocol().to_dict()
    assert not {"methods", "knn_k", "logreg_C", "shots", "seeds"} & set(record)
    assert record["refit"] is True and Protocol(refit=False).hash != Protocol().hash  # the choice is in the hash


def test_battery_settings_are_recorded_and_each_changes_the_hash():
    from probe import Protocol

    base = Protocol(methods="logreg,knn,linear", shots="1,5", seeds="0,1")
    assert base.methods == ("linear", "knn", "logreg") and base.shots == (1, 5) and base.seeds == (0, 1)
    assert Protocol.from_dict(json.loads(json.dumps(base.to_dict()))).hash == base.hash
    changes = {
        "methods": "linear,knn",
        "knn_k": "10,20",
        "knn_temperature": 0.1,
        "knn_weights": "uniform",
        "logreg_C": "0.1,1",
        "logreg_max_iter": 100,
        "logreg_tol": 1e-5,
        "refit": False,
        "shots": "1,all",
        "seeds": "0,1,2",
    }
    hashes = {base.hash} | {base.replace(**{k: v}).hash for k, v in changes.items()}
    assert len(hashes) == len(changes) + 1
    # settings of a method that does not run do not act, so they do not split comparisons
    assert Protocol(knn_k="5").hash == Protocol().hash
    assert Protocol(methods="knn", logreg_C="1").hash == Protocol(methods="knn").hash
    assert len(Protocol(methods="logreg").logreg_C) == 45 and Protocol(seeds="3,1").seed == 3
    assert Protocol(shots="all,5").run_shots == (None, 5)
    for bad in (
        dict(methods="svm"),
        dict(knn_k="0"),
        dict(knn_weights="distance"),
        dict(logreg_C="0,1"),
        dict(shots="x"),
        dict(seeds="-1"),
        dict(knn_temperature=0),
    ):
        with pytest.raises(UsageError):
            Protocol(**bad)
