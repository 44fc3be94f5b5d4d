"""Shazeer et al. 2017's balancing losses: CV^2 of expert importance and of a smooth expert load.

Einsum letters: G routing groups, S tokens per group, K choices per token, E experts.

"Outrageously Large Neural Networks" (section 4 and appendix A) balances its noisy top-k gate
with two losses, each a weight times the squared coefficient of variation (variance / mean^2)
of a per-expert sum over the batch:
  - importance (eq. 6-7): Importance_i = sum_x G(x)_i, the gate values the tokens give expert i;
  - load (eq. 8-11): Load_i = sum_x P(x, i), with P(x, i) the probability, over a new draw of
    expert i's noise only, that expert i is still in the token's top k:
      P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / Softplus((x W_noise)_i)),
    H(x) the noisy logits and kth_excluding(v, k, i) the k-th largest of v without v_i. Unlike
    the count of tokens per expert, it is smooth in both W_g and W_noise.
Shazeer computes both per batch; here each is computed per routing group (the scope of
capacity and of the Switch balance loss) and averaged over groups. `MoeLayer` reports both for
every layer (`layer_stats.MOE`); `moe.importance_loss_coef` and `moe.load_loss_coef` add them
to the training loss. Everything runs in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stmoe_jax.moe import routing

# tensor2tensor's `cv_squared` epsilon: a group whose per-expert sums are all 0 (only padding)
# has CV^2 0, not 0/0.
_EPSILON = 1e-10
# Softplus of a very negative input underflows to 0 in float32; a 0/0 in P(x, i) would be NaN.
_MIN_NOISE_STD = 1e-9


def cv_squared(x_GE: jax.Array) -> jax.Array:
  """float32 [G]: squared coefficient of variation over the experts of each group's sums x_GE,
  population variance / (mean^2 + 1e-10) as tensor2tensor's `cv_squared` (the PyTorch port
  davidmrau/mixture-of-experts takes the sample variance, E/(E-1) times this); 0 when balanced."""
  x_GE = x_GE.astype(jnp.float32)
  return jnp.var(x_GE, axis=-1) / (jnp.mean(x_GE, axis=-1) ** 2 + _EPSILON)


def importance_loss(gate_GSK: jax.Array, expert_index_GSK: jax.Array,
                    num_experts: int) -> jax.Array:
  """CV(Importance)^2 averaged over groups (Shazeer eq. 6-7), a float32 scalar.

  Importance_GE sums, over a group's tokens, the gate of every choice that went to each expert.
  `gate_GSK` must be 0 for choices that do not count (padding, choices the later-choice policy
  did not route); gates of choices dropped for capacity do count (`Routing.assigned_gate`):
  Shazeer's gate has no capacity, and leaving them out would make an overflowing expert look
  less important. Scaling every gate by a constant (`moe.routed_scaling_factor`) changes nothing.
  """
  onehot_GSKE = jax.nn.one_hot(expert_index_GSK, num_experts, dtype=jnp.float32)
  importance_GE = jnp.einsum('gske,gsk->ge', onehot_GSKE, gate_GSK.astype(jnp.float32))
  return jnp.mean(cv_squared(importance_GE))


def kth_excluding(noisy_GSE: jax.Array, k: int) -> jax.Array:
  """float32 [G, S, E]: for each expert i, the k-th largest noisy logit of the OTHER experts.

  For an expert in the token's top k that is the (k+1)-th largest logit overall, for one outside
  it the k-th (tensor2tensor `_prob_in_top_k`). Needs E > k (with E = k the others are only
  k - 1 and every expert is always chosen). Ties at the k-th place count as in.
  Differentiable in the logits, like the top-k values it gathers.
  """
  top_GSX, _ = jax.lax.top_k(noisy_GSE.astype(jnp.float32), k + 1)
  kth_GS1, next_GS1 = top_GSX[..., k - 1:k], top_GSX[..., k:k + 1]
  return jnp.where(noisy_GSE >= kth_GS1, next_GS1, kth_GS1)


def smooth_load(clean_GSE: jax.Array, noisy_GSE: jax.Array, noise_std_GSE: jax.Array, k: int,
                mask_GS: jax.Array | None = None) -> jax.Array:
  """float32 [G, E]: Shazeer's smooth load estimator, Load_i = sum over real tokens of P(x, i).

  P(x, i) = Phi((clean_i - kth_excluding(noisy, k, i)) / noise_std_i) (appendix A, eq. 9), the
  probability that expert i stays in the top k if only its noise were drawn again. Gradients
  reach W_g through the clean logit and the threshold (other experts' noisy logits) and W_noise
  through the scale and the threshold.

  Args:
    clean_GSE: router logits x W_g before the noise [G, S, E].
    noisy_GSE: the logits the top k was taken from, clean + N(0, 1) * noise_std [G, S, E].
    noise_std_GSE: Softplus(x W_noise) [G, S, E].
    k: experts per token.
    mask_GS: optional [G, S]; only tokens where it is nonzero count.
  """
  if k >= clean_GSE.shape[-1]:  # Every expert is in every token's top k: P = 1, no gradient.
    prob_GSE = jnp.ones(clean_GSE.shape, jnp.float32)
  else:
    threshold_GSE = kth_excluding(noisy_GSE, k)
    std_GSE = jnp.maximum(noise_std_GSE.astype(jnp.float32), _MIN_NOISE_STD)
    prob_GSE = jax.scipy.special.ndtr((clean_GSE.astype(jnp.float32) - threshold_GSE) / std_GSE)
  if mask_GS is not None:
    prob_GSE = prob_GSE * mask_GS[..., None].astype(jnp.float32)
  return jnp.sum(prob_GSE, axis=1)


def load_loss(clean_GSE: jax.Array, noisy_GSE: jax.Array, noise_std_GSE: jax.Array, k: int,
              mask_GS: jax.Array | None = None) -> jax.Array:
  """CV(Load)^2 of `smooth_load` averaged over groups (Shazeer eq. 11), a float32 scalar."""
  return jnp.mean(cv_squared(smooth_load(clean_GSE, noisy_GSE, noise_std_GSE, k, mask_GS)))


def cv_stats(route: routing.Routing, top_k: int, mask_GS: jax.Array | None = None
             ) -> dict[str, jax.Array]:
  """{'importance_loss', 'load_loss'}: the two float32 scalars of one routing decision.

  `load_loss` is Shazeer's smooth estimator when the router exposed its clean logits and noise
  scale (`Routing.clean_logits`, `Routing.noise_std`: tokens-choose routing with
  `moe.router_noise='noisy_top_k'`, in training). Otherwise (no noise, and at evaluation) it is
  the CV^2 of the hard load, the count of assigned choices per expert, which is the estimator's
  limit as the noise vanishes and has no gradient: config validation refuses a load loss
  coefficient there. Both leave out padding: `mask_GS` (optional [G, S], nonzero for real
  tokens) and `route.assigned`, which is False on it.
  """
  E = route.probs.shape[-1]
  gate_GSK = route.gate if route.assigned_gate is None else route.assigned_gate
  stats = {'importance_loss': importance_loss(gate_GSK, route.expert_index, E)}
  if route.clean_logits is not None and route.noise_std is not None:
    stats['load_loss'] = load_loss(route.clean_logits, route.logits, route.noise_std, top_k,
                                   mask_GS)
  else:
    onehot_GSKE = jax.nn.one_hot(route.expert_index, E, dtype=jnp.float32)
    counts_GE = jnp.einsum('gske,gsk->ge', onehot_GSKE, route.assigned.astype(jnp.float32))
    stats['load_loss'] = jnp.mean(cv_squared(counts_GE))
  return stats
