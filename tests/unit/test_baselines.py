"""Single-positive baselines (AN, AN-LS, WAN, EPR, EM, EM+APL, ROLE): values by hand, gradients, validation, ROLE's table."""

import math
import re

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from avgk.config import LOSSES, LossConfig, ModelConfig
from avgk.method.losses import (
    an_loss,
    an_ls_loss,
    apl_negative_mask,
    build_loss,
    em_apl_loss,
    em_loss,
    epr_loss,
    role_loss,
    score_head_for,
    wan_loss,
)
from avgk.method.losses.role import RoleLoss
from avgk.models.networks import build_model

# A 4 x 3 batch written out; labels are the single observed positives.
Z = np.array([[0.5, -1.0, 2.0], [-0.3, 0.8, -2.5], [1.2, -0.4, 0.1], [-1.5, 0.3, -0.7]])
Y = np.array([2, 0, 1, 0])
B, L = Z.shape
POS = np.eye(L)[Y]
# APL with proportion 1/2: class 0 has 2 unobserved entries (rows 0, 2) -> 1 chosen: row 0 (0.5 < 1.2);
# class 1 has 3 (rows 0, 1, 3) -> floor(1.5 + 1/2) = 2: rows 0 (-1.0) and 3 (0.3);
# class 2 has 3 (rows 1, 2, 3) -> 2: rows 1 (-2.5) and 3 (-0.7).
APL_MASK = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 1, 1]])
BASELINES = ["an", "an_ls", "wan", "epr", "em", "em_apl", "role"]


def _p(z):
    return 1 / (1 + np.exp(-z))


def _bce(p, t):
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def _entropy(p):
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def _reduce(terms, reduction):
    return terms.sum() / (L if reduction == "mean" else 1)


def _epr_reg(p, k):
    return (p.sum(1).mean() - k) ** 2 / L**2


def expected_mean(name, reduction, *, eps=0.1, k=1.5, alpha=0.2, beta=0.7, apl_mask=APL_MASK):
    """Batch mean of each loss from the docs/METHOD.md formulas, in numpy."""
    p = _p(Z)
    pos_terms = POS * -np.log(p)
    if name == "an":
        return _reduce(pos_terms + (1 - POS) * -np.log(1 - p), reduction) / B
    if name == "an_ls":
        return _reduce(_bce(p, (1 - eps) * POS + eps * (1 - POS)), reduction) / B
    if name == "wan":
        return _reduce(pos_terms + (1 - POS) * -np.log(1 - p) / (L - 1), reduction) / B
    if name == "epr":
        return _reduce(pos_terms, reduction) / B + _epr_reg(p, k)
    if name == "em":
        return _reduce(pos_terms + (1 - POS) * -alpha * _entropy(p), reduction) / B
    if name == "em_apl":
        unknown = 1 - POS - apl_mask
        return _reduce(pos_terms + unknown * -alpha * _entropy(p) + apl_mask * beta * -np.log(1 - p), reduction) / B
    raise AssertionError(name)


def _t(a):
    return torch.tensor(a, dtype=torch.float32)


LABELS = torch.tensor(Y)

PURE = {
    "an": lambda r: an_loss(logits=_t(Z), labels=LABELS, reduction=r),
    "an_ls": lambda r: an_ls_loss(logits=_t(Z), labels=LABELS, reduction=r, eps=0.1),
    "wan": lambda r: wan_loss(logits=_t(Z), labels=LABELS, reduction=r),
    "epr": lambda r: epr_loss(logits=_t(Z), labels=LABELS, reduction=r, k=1.5),
    "em": lambda r: em_loss(logits=_t(Z), labels=LABELS, reduction=r, alpha=0.2),
    "em_apl": lambda r: em_apl_loss(logits=_t(Z), labels=LABELS, reduction=r, alpha=0.2, beta=0.7, neg_proportion=0.5),
}


def _config(name, reduction="sum", **kw):
    base = dict(k=1.5, eps=0.1, alpha=0.2, beta=0.7, apl_warmup_epochs=0, apl_neg_proportion=0.5)
    return LossConfig(name=name, reduction=reduction, **{**base, **kw})


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name", sorted(PURE))
def test_pure_function_and_module_match_hand_formula(name, reduction):
    expected = expected_mean(name, reduction)
    assert PURE[name](reduction).item() == pytest.approx(expected, rel=1e-5)
    loss = build_loss(_config(name, reduction), num_classes=L, num_train=10)
    out = loss(logits={"multilabel": _t(Z)}, labels=LABELS, idx=torch.arange(B), epoch=0)
    assert out.total_sum.item() == pytest.approx(B * expected, rel=1e-5)  # modules return sums
    assert sum(out.parts_sum.values()).item() == pytest.approx(out.total_sum.item(), rel=1e-6)
    assert all(not v.requires_grad for v in out.parts_sum.values())


def test_mean_reduction_matches_reference_scale():
    # Cole et al. / Zhou et al. divide every entry by B * L and add the regulariser undivided.
    p = _p(Z)
    assert an_loss(logits=_t(Z), labels=LABELS, reduction="mean").item() == pytest.approx(
        (POS * -np.log(p) + (1 - POS) * -np.log(1 - p)).mean(), rel=1e-6
    )
    assert epr_loss(logits=_t(Z), labels=LABELS, reduction="mean", k=1.5).item() == pytest.approx(
        (POS * -np.log(p)).mean() + _epr_reg(p, 1.5), rel=1e-6
    )


def test_an_literal_value():
    # Row 0 alone, label 2: -log sigmoid(2) - log(1 - sigmoid(0.5)) - log(1 - sigmoid(-1)).
    value = an_loss(logits=_t(Z[:1]), labels=LABELS[:1], reduction="sum").item()
    assert value == pytest.approx(math.log1p(math.exp(-2)) + math.log1p(math.exp(0.5)) + math.log1p(math.exp(-1)), rel=1e-6)


def test_apl_mask_picks_lowest_unobserved_per_class():
    mask = apl_negative_mask(logits=_t(Z), labels=LABELS, proportion=0.5)
    assert mask.dtype == torch.bool and np.array_equal(mask.numpy(), APL_MASK.astype(bool))
    assert not (mask & torch.tensor(POS, dtype=torch.bool)).any()  # never an observed positive
    # 0.1 * 2 or 0.1 * 3 unobserved entries rounds to 0: nothing chosen.
    assert not apl_negative_mask(logits=_t(Z), labels=LABELS, proportion=0.1).any()
    assert apl_negative_mask(logits=_t(Z), labels=LABELS, proportion=1.0).sum() == B * L - B


def test_em_apl_warmup_switches_apl_on_only_after_warmup():
    loss = build_loss(_config("em_apl", apl_warmup_epochs=2), num_classes=L, num_train=10)
    for epoch, mask in [(0, 0 * APL_MASK), (1, 0 * APL_MASK), (2, APL_MASK), (5, APL_MASK)]:
        out = loss(logits={"multilabel": _t(Z)}, labels=LABELS, idx=torch.arange(B), epoch=epoch)
        assert out.total_sum.item() == pytest.approx(B * expected_mean("em_apl", "sum", apl_mask=mask), rel=1e-5)
        assert set(out.parts_sum) == {"pos", "entropy", "apl"}
        assert (out.parts_sum["apl"].item() > 0) == (epoch >= 2)
    assert expected_mean("em_apl", "sum", apl_mask=0 * APL_MASK) == pytest.approx(expected_mean("em", "sum"))


@pytest.mark.parametrize("name", BASELINES)
def test_gradients_reach_head_and_backbone(name):
    model = build_model(ModelConfig(width=8), num_classes=5, heads=LOSSES.get(name).heads)
    assert set(model.heads) == {"multilabel"}
    loss = build_loss(LossConfig(name=name, k=2, apl_warmup_epochs=0, apl_neg_proportion=0.5), num_classes=5, num_train=10)
    out = loss(logits=model(torch.randn(4, 3, 16, 16)), labels=torch.tensor([0, 1, 2, 3]), idx=torch.arange(4), epoch=0)
    (out.total_sum / 4).backward()
    for pname in ("heads.multilabel.weight", "backbone.features.0.0.weight"):
        grad = dict(model.named_parameters())[pname].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (name, pname)
    assert score_head_for(LossConfig(name=name)) == "multilabel"
    with pytest.raises(ValueError, match="trains only"):
        score_head_for(LossConfig(name=name, score_head="softmax"))


@pytest.mark.parametrize("name", BASELINES)
def test_extreme_logits_stay_finite(name):
    logits = torch.tensor([[100.0, -100.0, 30.0], [-80.0, 90.0, 0.0]], requires_grad=True)
    loss = build_loss(_config(name), num_classes=L, num_train=10)
    out = loss(logits={"multilabel": logits}, labels=torch.tensor([1, 0]), idx=torch.tensor([3, 7]), epoch=0)
    out.total_sum.backward()
    assert torch.isfinite(out.total_sum) and torch.isfinite(logits.grad).all()


EM_APL = dict(reduction="sum", alpha=0.1, beta=1.0, warmup_epochs=1, neg_proportion=0.5)
ROLE = dict(reduction="sum", k=2, lr=1.0, num_classes=5, num_train=3)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("an", dict(reduction="avg"), r"loss.reduction must be 'sum' or 'mean', got 'avg'"),
        ("an_ls", dict(reduction="sum", eps=1.0), r"loss.eps must be in \[0, 1\), got 1.0"),
        ("an_ls", dict(reduction="sum", eps=-0.1), r"loss.eps must be in \[0, 1\), got -0.1"),
        ("wan", dict(reduction="sum", num_classes=1), r"at least 2 classes, got num_classes=1"),
        ("epr", dict(reduction="sum", k=0.0, num_classes=5), r"loss.k must be in \(0, 5\) .*got 0.0"),
        ("epr", dict(reduction="sum", k=5.0, num_classes=5), r"loss.k must be in \(0, 5\) .*got 5.0"),
        ("em", dict(reduction="sum", alpha=-1.0), r"loss.alpha must be a finite number >= 0, got -1.0"),
        ("em", dict(reduction="sum", alpha=math.nan), r"loss.alpha must be a finite number >= 0, got nan"),
        ("em_apl", {**EM_APL, "beta": -1.0}, r"loss.beta .* got -1.0"),
        ("em_apl", {**EM_APL, "warmup_epochs": -1}, r"apl_warmup_epochs .* got -1"),
        ("em_apl", {**EM_APL, "neg_proportion": 0.0}, r"apl_neg_proportion must be in \(0, 1\], got 0.0"),
        ("em_apl", {**EM_APL, "neg_proportion": 1.5}, r"apl_neg_proportion must be in \(0, 1\], got 1.5"),
        ("role", {**ROLE, "lr": 0.0}, r"loss.role_lr must be a finite number > 0, got 0.0"),
        ("role", {**ROLE, "num_train": 0}, r"num_train >= 1 .*got 0"),
        ("role", {**ROLE, "k": 7}, r"loss.k must be in \(0, 5\)"),
        ("role", {**ROLE, "table_device": "disk"}, r"role_table_device must be one of model, cpu, memmap, got 'disk'"),
        ("role", {**ROLE, "table_device": "memmap"}, r"role_table_path must be set exactly when"),
    ],
)
def test_hyperparameter_validation(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LOSSES.get(name)(**kwargs)


def test_pure_functions_validate_too():
    with pytest.raises(ValueError, match=r"loss.eps must be in \[0, 1\), got 1.5"):
        an_ls_loss(logits=_t(Z), labels=LABELS, reduction="sum", eps=1.5)
    with pytest.raises(ValueError, match=re.escape("loss.reduction must be")):
        em_loss(logits=_t(Z), labels=LABELS, reduction="none", alpha=0.1)
    with pytest.raises(ValueError, match=r"loss.k must be in \(0, 3\)"):
        epr_loss(logits=_t(Z), labels=LABELS, reduction="sum", k=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(role_table_device="memmap"), "role_table_path must be set exactly when"),
        (dict(role_table_path="/tmp/t.f32"), "role_table_path must be set exactly when"),
        (dict(role_lr=0), "role_lr"),
    ],
)
def test_role_config_validation(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        LossConfig(name="role", **kwargs)


# ---------------------------------------------------------------- ROLE

U = np.array([[0.2, -0.1, 3.0], [4.0, 0.3, -0.4], [-0.2, 2.5, 0.0], [1.0, 0.1, -0.3]])  # table rows of the batch


def _role_expected_mean(reduction, k=1.5):
    p, q = _p(Z), _p(U)
    cls = 0.5 * (_reduce(POS * -np.log(p) + _bce(p, q), reduction) + B * _epr_reg(p, k))
    est = 0.5 * (_reduce(POS * -np.log(q) + _bce(q, p), reduction) + B * _epr_reg(q, k))
    return cls / B, est / B


def _role(reduction="sum", lr=0.5, num_train=10, **kw):
    return RoleLoss(reduction=reduction, k=1.5, lr=lr, num_classes=L, num_train=num_train, **kw)


def _forward(loss, idx, logits=None):
    logits = _t(Z) if logits is None else logits
    return loss(logits={"multilabel": logits}, labels=LABELS, idx=idx, epoch=0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_role_value_matches_hand_formula(reduction):
    cls, est = _role_expected_mean(reduction)
    assert role_loss(logits=_t(Z), estimate_logits=_t(U), labels=LABELS, reduction=reduction, k=1.5).item() == pytest.approx(
        cls + est, rel=1e-5
    )
    loss = _role(reduction)
    idx = torch.tensor([7, 2, 9, 0])
    loss.write_rows(idx, _t(U))
    out = _forward(loss, idx)
    assert out.total_sum.item() == pytest.approx(B * (cls + est), rel=1e-5)
    assert out.parts_sum["classifier"].item() == pytest.approx(B * cls, rel=1e-5)
    assert out.parts_sum["estimator"].item() == pytest.approx(B * est, rel=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_role_step_touches_only_batch_rows_with_the_analytic_gradient(reduction):
    loss, lr = _role(reduction, lr=0.5), 0.5
    idx = torch.tensor([7, 2, 9, 0])
    loss.write_rows(idx, _t(U))
    before = loss.table_NL.clone()
    _forward(loss, idx)
    changed = (loss.table_NL != before).any(1).nonzero().flatten().tolist()
    assert changed == [0, 2, 7, 9]
    # d(estimator part)/du per entry, per-sample (not / B); under 'mean' the step is scaled back by L.
    p, q = _p(Z), _p(U)
    reg_scale = L if reduction == "mean" else 1
    grad = 0.5 * (q - p - POS * (1 - q)) + reg_scale * (q.sum(1).mean() - 1.5) / L**2 * q * (1 - q)
    assert np.allclose(loss.table_NL[idx].numpy(), U - lr * grad, atol=1e-6)


def test_role_estimator_and_classifier_train_on_each_others_detached_outputs():
    z = _t(Z).requires_grad_(True)
    u = _t(U).requires_grad_(True)
    role_loss(logits=z, estimate_logits=u, labels=LABELS, reduction="sum", k=1.5).backward()
    p, q = _p(Z), _p(U)
    # d/dz of the classifier half only (sum reduction, batch mean): 0.5 (p - q - pos (1 - p)) / B + reg.
    expected_z = (0.5 * (p - q - POS * (1 - p)) + (p.sum(1).mean() - 1.5) / L**2 * p * (1 - p)) / B
    expected_u = (0.5 * (q - p - POS * (1 - q)) + (q.sum(1).mean() - 1.5) / L**2 * q * (1 - q)) / B
    assert np.allclose(z.grad.numpy(), expected_z, atol=1e-6)
    assert np.allclose(u.grad.numpy(), expected_u, atol=1e-6)


def test_role_table_init_and_first_visit_sets_the_observed_positive():
    torch.manual_seed(3)
    loss = _role(num_train=6)
    half_width = math.log(0.6 / 0.4)
    assert loss.table_NL.shape == (6, L) and loss.table_NL.dtype == torch.float32
    assert loss.table_NL.abs().max() <= half_width and not loss.seen_N.any()
    before = loss.table_NL.clone()
    idx = torch.tensor([5, 1, 0, 3])
    with torch.no_grad():  # no step without grad: only the first-visit initialisation happens
        _forward(loss, idx)
    positive = torch.zeros(6, L, dtype=torch.bool)
    positive[idx, LABELS] = True
    assert torch.allclose(loss.table_NL[positive], torch.tensor(math.log(0.995 / 0.005)))
    assert torch.equal(loss.table_NL[~positive], before[~positive])
    assert loss.seen_N.tolist() == [True, True, False, True, False, True]
    # Same global seed -> same table (every rank starts identical); the global RNG is not consumed.
    torch.manual_seed(3)
    state = torch.get_rng_state()
    assert torch.equal(_role(num_train=6).table_NL, before)
    assert torch.equal(torch.get_rng_state(), state)


def test_role_no_step_in_eval_mode():
    loss = _role()
    idx = torch.tensor([1, 2, 3, 4])
    loss.write_rows(idx, _t(U))
    before = loss.table_NL.clone()
    loss.eval()
    _forward(loss, idx)
    assert torch.equal(loss.table_NL, before)
    loss.train()
    _forward(loss, idx)
    assert not torch.equal(loss.table_NL, before)


def test_role_state_dict_round_trip_restores_the_table_exactly(tmp_path):
    torch.manual_seed(0)
    trained = _role()
    for idx in (torch.tensor([7, 2, 9, 0]), torch.tensor([1, 2, 3, 4])):
        _forward(trained, idx, logits=torch.randn(B, L))
    torch.save(trained.state_dict(), tmp_path / "loss.pt")
    torch.manual_seed(1)
    fresh = _role()
    assert not torch.equal(fresh.table_NL, trained.table_NL)
    fresh.load_state_dict(torch.load(tmp_path / "loss.pt"))
    assert torch.equal(fresh.table_NL, trained.table_NL) and torch.equal(fresh.seen_N, trained.seen_N)
    idx = torch.tensor([5, 6, 2, 8])
    assert torch.equal(_forward(fresh, idx).total_sum, _forward(trained, idx).total_sum)
    assert torch.equal(fresh.table_NL, trained.table_NL)


def test_role_idx_validation():
    loss = _role(num_train=10)
    with pytest.raises(ValueError, match=r"every idx in \[0, num_train=10\).*got min 0 max 10"):
        _forward(loss, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"every idx in \[0, num_train=10\).*got min -1"):
        _forward(loss, torch.tensor([-1, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"4 integer sample ids, got shape \(3,\)"):
        _forward(loss, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer sample ids"):
        _forward(loss, torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_role_cpu_table_stays_on_cpu_and_float32():
    cpu = _role(table_device="cpu")
    cpu.to(torch.float64).to("meta")
    assert cpu.table_NL.device.type == "cpu" and cpu.table_NL.dtype == torch.float32
    assert cpu.seen_N.device.type == "cpu"
    _forward(cpu, torch.arange(B))  # still usable
    model_side = _role(table_device="model").to("meta")
    assert model_side.table_NL.device.type == "meta"  # 'model' follows the module


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_role_cpu_table_with_gpu_logits():
    loss = _role(table_device="cpu").to("cuda")
    idx = torch.tensor([7, 2, 9, 0], device="cuda")
    loss.write_rows(idx, _t(U))
    logits = _t(Z).cuda().requires_grad_(True)
    out = loss(logits={"multilabel": logits}, labels=LABELS.cuda(), idx=idx, epoch=0)
    out.total_sum.backward()
    assert out.total_sum.device.type == "cuda" and loss.table_NL.device.type == "cpu"
    assert out.total_sum.item() == pytest.approx(B * sum(_role_expected_mean("sum")), rel=1e-5)
    gpu = _role(table_device="model").to("cuda")
    assert gpu.table_NL.device.type == "cuda"
    _forward(gpu, idx, logits=_t(Z).cuda())


def test_role_memmap_table(tmp_path):
    path = tmp_path / "role" / "table.f32"
    loss = build_loss(
        LossConfig(name="role", k=1.5, role_table_device="memmap", role_table_path=str(path)), num_classes=L, num_train=10
    )
    assert path.stat().st_size == 4 * 10 * L
    idx = torch.tensor([7, 2, 9, 0])
    _forward(loss, idx)
    on_disk = np.memmap(path, dtype=np.float32, mode="r", shape=(10, L))
    assert np.array_equal(on_disk, loss.table_NL.numpy())
    loss.to(torch.float64)  # stays the float32 file-backed tensor
    _forward(loss, torch.tensor([1, 3, 5, 7]))
    assert loss.table_NL.dtype == torch.float32 and np.array_equal(on_disk, loss.table_NL.numpy())
    other = _role(table_device="memmap", table_path=str(tmp_path / "other.f32"))
    other.load_state_dict(loss.state_dict())
    assert np.array_equal(np.memmap(tmp_path / "other.f32", dtype=np.float32, mode="r", shape=(10, L)), on_disk)


def test_role_rows_for_cross_rank_sync():
    # What the engine does with several ranks: gather (idx, rows) after each step, write them everywhere.
    a, b = _role(), _role()
    idx = torch.tensor([7, 2, 9, 0])
    _forward(a, idx, logits=torch.randn(B, L))
    b.write_rows(idx, a.read_rows(idx))
    assert torch.equal(a.table_NL, b.table_NL) and torch.equal(a.seen_N, b.seen_N)
