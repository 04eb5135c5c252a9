"""Every loss against a float64 numpy transcription of its formula (TRL 1.16's definitions), and the metrics
against numpy: per pair, on random log-probs, relative error <= 1e-6."""

import numpy as np
import pytest

from dpo_jax import losses
from dpo_jax.errors import UserError
from dpo_jax.losses import LossConfig, PairLogps


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_loss(name, x, beta=0.1, eps=0.0, tau=0.05, gamma=0.5):
    """float64 numpy, written from the papers' / TRL's formulas, independently of dpo_jax.losses."""
    pw, pl, rw, rl, nw, nl = (x[k] for k in ("chosen", "rejected", "ref_chosen", "ref_rejected",
                                             "chosen_tokens", "rejected_tokens"))
    cw, cl = pw - rw, pl - rl
    d = cw - cl
    if name == "sigmoid":
        return -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
    if name == "robust":
        return (-(1 - eps) * logsig(beta * d) + eps * logsig(-beta * d)) / (1 - 2 * eps)
    if name == "hinge":
        return np.maximum(0.0, 1 - beta * d)
    if name == "ipo":
        return (cw / nw - cl / nl - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        z = beta * d
        return sig(z) * (logsig(z) - np.log(1 - eps)) + sig(-z) * (logsig(-z) - np.log(eps))
    if name == "nca_pair":
        return -logsig(beta * cw) - 0.5 * logsig(-beta * cw) - 0.5 * logsig(-beta * cl)
    if name == "bco_pair":
        return -logsig(beta * cw) - logsig(-beta * cl)
    if name == "sppo_hard":
        return (cw - 0.5 / beta) ** 2 + (cl + 0.5 / beta) ** 2
    if name == "aot":
        u = np.sort(pw - pl) - np.sort(rw - rl)
        return -(1 - eps) * logsig(beta * u) - eps * logsig(-beta * u)
    if name == "aot_unpaired":
        u = np.sort(cw) - np.sort(cl)
        return -(1 - eps) * logsig(beta * u) - eps * logsig(-beta * u)
    if name == "apo_zero":
        return (1 - sig(beta * cw)) + sig(beta * cl)
    if name == "apo_down":
        return sig(beta * cw) + (1 - sig(beta * d))
    if name == "discopop":
        z = beta * d
        m = sig(z / tau)
        return -logsig(z) * (1 - m) + np.exp(-z) * m
    if name == "sigmoid_norm":
        return -logsig(beta * (cw / nw - cl / nl))
    if name == "simpo":
        z = beta * (pw / nw - pl / nl) - gamma
        return -(1 - eps) * logsig(z) - eps * logsig(-z)
    if name == "sft":
        return -pw  # numerator; the step divides by the chosen tokens
    raise KeyError(name)


def random_inputs(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = {"chosen": -rng.uniform(5, 60, n), "rejected": -rng.uniform(5, 60, n),
         "chosen_tokens": rng.integers(1, 40, n).astype(float), "rejected_tokens": rng.integers(1, 40, n).astype(float)}
    x["ref_chosen"] = x["chosen"] + rng.normal(0, 8, n)
    x["ref_rejected"] = x["rejected"] + rng.normal(0, 8, n)
    x = {k: v.astype(np.float32).astype(np.float64) for k, v in x.items()}  # exactly representable in float32
    return x, PairLogps(**{k: np.asarray(v, np.float32) for k, v in x.items()})


SMOOTHED = {"robust": 0.1, "exo_pair": 1e-3, "sigmoid": 0.1, "aot": 0.1, "aot_unpaired": 0.1, "simpo": 0.1}


@pytest.mark.parametrize("name", list(losses.LOSSES))
@pytest.mark.parametrize("smoothing", [False, True])
def test_loss_matches_numpy(name, smoothing):
    eps = SMOOTHED.get(name, 0.0) if smoothing else (1e-3 if name == "exo_pair" else 0.0)
    x, p = random_inputs()
    cfg = LossConfig(loss_type=(name,), beta=0.1, label_smoothing=eps)
    ours = np.asarray(losses.LOSSES[name](p, cfg), np.float64)
    theirs = reference_loss(name, x, beta=0.1, eps=eps)
    if name.startswith("aot"):  # a loss per rank, handed to the pairs in rank order: compare the multisets
        ours, theirs = np.sort(ours), np.sort(theirs)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7 * np.abs(theirs).max())


def test_weighted_combination_and_rpo(monkeypatch):
    """MPO-style weights plus an RPO NLL term, through the step's normalisation: per pair for the pair
    losses, per chosen token for the NLL."""
    import jax.numpy as jnp

    from dpo_jax import step as S

    x, p = random_inputs(8)
    cfg = S.StepConfig(loss=LossConfig(loss_type=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0),
                                       rpo_alpha=0.5))
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 1], np.float32)  # one filler pair
    monkeypatch.setattr(S, "pair_logps", lambda *a, **k: (p, jnp.zeros((8, 2))))
    counts = {"pairs": jnp.float32(mask.sum()), "chosen_tokens": jnp.float32((x["chosen_tokens"] * mask).sum())}
    loss, _ = S._micro_loss(None, None, None, None, {"pair_mask": mask}, counts, cfg)
    m = mask.astype(bool)
    nll = -x["chosen"][m].sum() / x["chosen_tokens"][m].sum()
    expected = 0.8 * reference_loss("sigmoid", x)[m].mean() + 0.2 * reference_loss("bco_pair", x)[m].mean() \
        + 1.0 * nll + 0.5 * nll
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_metrics_match_numpy():
    import jax.numpy as jnp

    x, p = random_inputs(16, seed=3)
    x["rejected"][:3], x["ref_rejected"][:3] = x["chosen"][:3], x["ref_chosen"][:3]  # ties: not accurate
    p = PairLogps(**{k: np.asarray(v, np.float32) for k, v in x.items()})
    mask = np.ones(16, np.float32)
    mask[-2:] = 0
    m = mask.astype(bool)
    cfg = LossConfig(beta=0.25)
    logit_c, logit_r = jnp.float32(12.5), jnp.float32(-3.0)
    out = losses.finish_metrics(losses.metric_sums(p, mask, logit_c, logit_r, cfg))
    rc, rr = 0.25 * (x["chosen"] - x["ref_chosen"]), 0.25 * (x["rejected"] - x["ref_rejected"])
    expected = {"rewards/chosen": rc[m].mean(), "rewards/rejected": rr[m].mean(),
                "rewards/accuracies": (rc > rr)[m].mean(), "rewards/margins": (rc - rr)[m].mean(),
                "logps/chosen": x["chosen"][m].mean(), "logps/rejected": x["rejected"][m].mean(),
                "logits/chosen": 12.5 / x["chosen_tokens"][m].sum(), "logits/rejected": -3.0 / x["rejected_tokens"][m].sum()}
    assert float(out["rewards/accuracies"]) <= 13 / 14
    for k, v in expected.items():
        np.testing.assert_allclose(float(out[k]), v, rtol=1e-6, atol=1e-7, err_msg=k)


def test_bad_loss_options_are_errors():
    with pytest.raises(UserError, match="unknown loss_type sigmod; the losses are sigmoid, robust"):
        LossConfig(loss_type=("sigmod",))
    with pytest.raises(UserError, match="loss_weights has 1 weights for 2 losses"):
        LossConfig(loss_type=("sigmoid", "sft"), loss_weights=(1.0,))
    with pytest.raises(UserError, match="robust loss needs label_smoothing"):
        LossConfig(loss_type=("robust",), label_smoothing=0.5)


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_sorting_losses_ignore_filler_pairs(name):
    """Filler pairs (mask 0) sort last and get no loss: the real pairs' losses are those of a batch without
    them, whatever the filler values."""
    x, p = random_inputs(6, seed=4)
    cfg = LossConfig(loss_type=(name,))
    alone = np.asarray(losses.LOSSES[name](p, cfg))
    filler = {k: np.concatenate([v, np.array([0.0, -1e3], np.float32)]) for k, v in vars(p).items() if v is not None}
    mask = np.array([1] * 6 + [0, 0], np.float32)
    with_filler = np.asarray(losses.LOSSES[name](PairLogps(**filler, mask=mask), cfg))
    np.testing.assert_allclose(with_filler[:6].sum(), alone.sum(), rtol=1e-6)
    assert (with_filler[6:] == 0).all()
    np.testing.assert_allclose(alone.sum(), reference_loss(name, x).sum(), rtol=1e-6)


def test_length_normalised_losses_use_all_completion_tokens():
    """ipo and sigmoid_norm divide by TRL's completion_mask.sum (chosen_length), not the counted tokens."""
    x, p = random_inputs(4, seed=5)
    lengths = {"chosen_length": np.asarray(x["chosen_tokens"] + 1, np.float32),
               "rejected_length": np.asarray(x["rejected_tokens"] + 1, np.float32)}
    q = PairLogps(**{k: v for k, v in vars(p).items() if v is not None}, **lengths)
    y = dict(x, chosen_tokens=x["chosen_tokens"] + 1, rejected_tokens=x["rejected_tokens"] + 1)
    for name in ("ipo", "sigmoid_norm"):
        np.testing.assert_allclose(np.asarray(losses.LOSSES[name](q, LossConfig(loss_type=(name,)))),
                                   reference_loss(name, y), rtol=1e-6)
