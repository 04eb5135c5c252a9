"""The DPO loss family, named as TRL's `loss_type`, and TRL's metrics.

Every loss is a small pure function of per-pair float32 arrays (`PairLogps`, shape [B]) returning the loss of
each pair; the step averages it over the real pairs of the global batch. Notation: pi_w, pi_l are the policy's
summed log-probs of the chosen (w) and rejected (l) completions, ref_w, ref_l the reference's,
rho_w = pi_w - ref_w and rho_l = pi_l - ref_l the log-ratios, d = rho_w - rho_l, n_w, n_l the completion lengths,
beta the DPO temperature and eps the label smoothing. `sft` is different: it is the NLL per chosen token,
averaged over all chosen tokens of the batch (as TRL), so it returns a numerator per pair; see `LOSSES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from .config import LOSS_TYPES, LossConfig


@jax.tree_util.register_dataclass
@dataclass
class PairLogps:
    """Per-pair inputs of the losses, all float32 [B]."""

    chosen: jax.Array  # pi_w: summed log-probs of the chosen completion under the policy
    rejected: jax.Array
    ref_chosen: jax.Array  # ref_w: the same under the reference (zeros when reference-free)
    ref_rejected: jax.Array
    chosen_tokens: jax.Array  # completion tokens counted in pi_w (a completion's first token only with a prompt)
    rejected_tokens: jax.Array
    chosen_length: jax.Array | None = None  # n_w: all completion tokens (TRL's completion_mask.sum), for ipo and
    rejected_length: jax.Array | None = None  # sigmoid_norm; None: the counted tokens
    mask: jax.Array | None = None  # 1 for real pairs, 0 for filler; None: all real


log_sigmoid = jax.nn.log_sigmoid


def sigmoid(p: PairLogps, c: LossConfig) -> jax.Array:
    """DPO: -(1 - eps) log s(beta d) - eps log s(-beta d); eps > 0 is conservative DPO (cDPO)."""
    d = p.chosen - p.ref_chosen - (p.rejected - p.ref_rejected)
    return -(1 - c.label_smoothing) * log_sigmoid(c.beta * d) - c.label_smoothing * log_sigmoid(-c.beta * d)


def robust(p: PairLogps, c: LossConfig) -> jax.Array:
    """Robust DPO: (-(1 - eps) log s(beta d) + eps log s(-beta d)) / (1 - 2 eps)."""
    d = _delta(p)
    return (-(1 - c.label_smoothing) * log_sigmoid(c.beta * d) + c.label_smoothing * log_sigmoid(-c.beta * d)) \
        / (1 - 2 * c.label_smoothing)


def hinge(p: PairLogps, c: LossConfig) -> jax.Array:
    """SLiC hinge: max(0, 1 - beta d)."""
    return jax.nn.relu(1 - c.beta * _delta(p))


def ipo(p: PairLogps, c: LossConfig) -> jax.Array:
    """IPO, length-averaged (TRL v1, confirmed with the IPO authors): (rho_w/n_w - rho_l/n_l - 1/(2 beta))^2."""
    return (_length_normalised_delta(p) - 1 / (2 * c.beta)) ** 2


def exo_pair(p: PairLogps, c: LossConfig) -> jax.Array:
    """EXO-pref (K=2): s(beta d)(log s(beta d) - log(1 - eps)) + s(-beta d)(log s(-beta d) - log eps)."""
    z = c.beta * _delta(p)
    return jax.nn.sigmoid(z) * (log_sigmoid(z) - jnp.log1p(-c.label_smoothing)) \
        + jax.nn.sigmoid(-z) * (log_sigmoid(-z) - jnp.log(c.label_smoothing))


def nca_pair(p: PairLogps, c: LossConfig) -> jax.Array:
    """NCA: -log s(beta rho_w) - log s(-beta rho_w)/2 - log s(-beta rho_l)/2."""
    w, l = c.beta * _ratio(p, "chosen"), c.beta * _ratio(p, "rejected")
    return -log_sigmoid(w) - 0.5 * log_sigmoid(-w) - 0.5 * log_sigmoid(-l)


def bco_pair(p: PairLogps, c: LossConfig) -> jax.Array:
    """BCO on pairs: -log s(beta rho_w) - log s(-beta rho_l)."""
    return -log_sigmoid(c.beta * _ratio(p, "chosen")) - log_sigmoid(-c.beta * _ratio(p, "rejected"))


def sppo_hard(p: PairLogps, c: LossConfig) -> jax.Array:
    """SPPO with hard labels: (rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2."""
    return (_ratio(p, "chosen") - 0.5 / c.beta) ** 2 + (_ratio(p, "rejected") + 0.5 / c.beta) ** 2


def aot(p: PairLogps, c: LossConfig) -> jax.Array:
    """AOT (paired): with u = sort(pi_w - pi_l) - sort(ref_w - ref_l) over the real pairs of the batch,
    -(1 - eps) log s(beta u) - eps log s(-beta u). Sorting couples the pairs of a (micro-)batch."""
    return _sorted_loss(p.chosen - p.rejected, p.ref_chosen - p.ref_rejected, p, c)


def aot_unpaired(p: PairLogps, c: LossConfig) -> jax.Array:
    """AOT (unpaired): u = sort(rho_w) - sort(rho_l) over the real pairs of the batch, then as `aot`."""
    return _sorted_loss(_ratio(p, "chosen"), _ratio(p, "rejected"), p, c)


def _sorted_loss(a: jax.Array, b: jax.Array, p: PairLogps, c: LossConfig) -> jax.Array:
    """The AOT loss of rank r (sort(a)[r] - sort(b)[r]) given to the real pair of rank r in a; fillers sort
    last (as +inf) and get 0, so they change nothing."""
    real = jnp.ones_like(a, bool) if p.mask is None else p.mask > 0
    a, b = jnp.where(real, a, jnp.inf), jnp.where(real, b, jnp.inf)
    u = jnp.where(jnp.arange(a.shape[0]) < real.sum(), jnp.sort(a) - jnp.sort(b), 0.0)
    ranked = -(1 - c.label_smoothing) * log_sigmoid(c.beta * u) - c.label_smoothing * log_sigmoid(-c.beta * u)
    ranked = jnp.where(jnp.arange(a.shape[0]) < real.sum(), ranked, 0.0)
    return jnp.zeros_like(ranked).at[jnp.argsort(a)].set(ranked)


def apo_zero(p: PairLogps, c: LossConfig) -> jax.Array:
    """APO-zero: 1 - s(beta rho_w) + s(beta rho_l)."""
    return 1 - jax.nn.sigmoid(c.beta * _ratio(p, "chosen")) + jax.nn.sigmoid(c.beta * _ratio(p, "rejected"))


def apo_down(p: PairLogps, c: LossConfig) -> jax.Array:
    """APO-down: s(beta rho_w) + 1 - s(beta (rho_w - rho_l))."""
    return jax.nn.sigmoid(c.beta * _ratio(p, "chosen")) + 1 - jax.nn.sigmoid(c.beta * _delta(p))


def discopop(p: PairLogps, c: LossConfig) -> jax.Array:
    """DiscoPOP: with z = beta d and m = s(z / tau), -log s(z) (1 - m) + exp(-z) m."""
    z = c.beta * _delta(p)
    m = jax.nn.sigmoid(z / c.discopop_tau)
    return -log_sigmoid(z) * (1 - m) + jnp.exp(-z) * m


def sigmoid_norm(p: PairLogps, c: LossConfig) -> jax.Array:
    """Length-normalised DPO: -log s(beta (rho_w/n_w - rho_l/n_l))."""
    return -log_sigmoid(c.beta * _length_normalised_delta(p))


def simpo(p: PairLogps, c: LossConfig) -> jax.Array:
    """SimPO (reference-free): -(1 - eps) log s(beta (pi_w/n_w - pi_l/n_l) - gamma) - eps log s(-(...))."""
    z = c.beta * (p.chosen / jnp.maximum(p.chosen_tokens, 1) - p.rejected / jnp.maximum(p.rejected_tokens, 1)) \
        - c.simpo_gamma
    return -(1 - c.label_smoothing) * log_sigmoid(z) - c.label_smoothing * log_sigmoid(-z)


def sft(p: PairLogps, c: LossConfig) -> jax.Array:
    """NLL on chosen, per chosen token: sum(-pi_w) / sum(n_w) over the batch. Returns the numerator -pi_w;
    the step divides by the batch's chosen tokens (see TOKEN_AVERAGED)."""
    return -p.chosen


def _ratio(p: PairLogps, which: str) -> jax.Array:
    return getattr(p, which) - getattr(p, f"ref_{which}")


def _length_normalised_delta(p: PairLogps) -> jax.Array:
    n_w = p.chosen_tokens if p.chosen_length is None else p.chosen_length
    n_l = p.rejected_tokens if p.rejected_length is None else p.rejected_length
    return _ratio(p, "chosen") / jnp.maximum(n_w, 1) - _ratio(p, "rejected") / jnp.maximum(n_l, 1)


def _delta(p: PairLogps) -> jax.Array:
    return _ratio(p, "chosen") - _ratio(p, "rejected")


LOSSES = {name: globals()[name] for name in LOSS_TYPES}  # config.LOSS_TYPES names them, in the README's order
TOKEN_AVERAGED = {"sft"}  # normalised by the batch's chosen tokens; the others by its real pairs
REFERENCE_FREE = {"simpo", "sft"}  # need no reference log-probs


def metric_sums(p: PairLogps, pair_mask: jax.Array, chosen_logit_sum: jax.Array, rejected_logit_sum: jax.Array,
                c: LossConfig) -> dict[str, jax.Array]:
    """Numerators of TRL's metrics, summed over the real pairs; `finish_metrics` divides them by the counts.

    Rewards are beta * (pi - ref) (for SimPO, beta * pi / n as its implicit reward would be; we keep TRL's
    beta * (pi - ref) with ref = 0); accuracy is strict: chosen reward > rejected reward."""
    m = pair_mask
    rc, rr = c.beta * _ratio(p, "chosen"), c.beta * _ratio(p, "rejected")
    return {
        "rewards/chosen": (rc * m).sum(), "rewards/rejected": (rr * m).sum(),
        "rewards/accuracies": ((rc > rr) * m).sum(), "rewards/margins": ((rc - rr) * m).sum(),
        "logps/chosen": (p.chosen * m).sum(), "logps/rejected": (p.rejected * m).sum(),
        "logits/chosen": chosen_logit_sum, "logits/rejected": rejected_logit_sum,
        "pairs": m.sum(), "chosen_tokens": (p.chosen_tokens * m).sum(), "rejected_tokens": (p.rejected_tokens * m).sum(),
    }


def finish_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Means from summed numerators and denominators: per pair, except logits per completion token (as TRL)."""
    pairs = jnp.maximum(sums["pairs"], 1)
    out = {k: v / pairs for k, v in sums.items() if k.startswith(("rewards/", "logps/"))}
    out["logits/chosen"] = sums["logits/chosen"] / jnp.maximum(sums["chosen_tokens"], 1)
    out["logits/rejected"] = sums["logits/rejected"] / jnp.maximum(sums["rejected_tokens"], 1)
    return out
