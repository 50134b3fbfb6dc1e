"""What every objective shares: the contract and the step's building blocks.

An objective is a module with

- `NOISE`: the names of the standard-normal draws [B, hdim] one iteration
  takes, in order (`step.train_step` draws them for the global batch and
  slices each device's rows, or takes them injected as `noise=`);
- `DIVERGED`: what to change when a step turns non-finite (the training
  loop's message);
- `FUSED`: whether it has a `mode='fused'` form (validation refuses it
  otherwise);
- `PASSES`: (encoder, decoder) model FLOPs per example in forward-pass
  equivalents (`hardware.analytic_flops`, the MFU numerator);
- `READS`: the config fields it reads beyond the model, data and optimisers
  (compare cells ignore changes to the others);
- `update(nets, state, x, noise, config, axis_name)` -> `(new, metrics)`,
  where `nets` is `Nets`, `x` the device's images in the compute dtype,
  `noise` a dict by `NOISE` name, and `new` is `(params_e, stats_e, opt_e,
  params_g, stats_g, opt_g)` with gradients averaged over `axis_name`.
  `metrics` holds scalars (device means; the shell averages them over
  devices) with at least `METRICS`.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from introvae_jax import models

# Keys every objective's metrics carry: the training loop, the 2-D toys and
# compare's KL figures read them.
METRICS = ('loss_rec', 'kl_real', 'kl_rec', 'kl_fake', 'loss_e', 'loss_g',
           'grad_norm_e', 'grad_norm_g', 'vae_phase')


class Nets(NamedTuple):
  encoder: Any
  decoder: Any
  tx_e: Any
  tx_g: Any


def apply(module, params, stats, x):
  """One train-mode call; returns (output, updated batch_stats)."""
  out, upd = module.apply({'params': params, 'batch_stats': stats}, x,
                          train=True, mutable=['batch_stats'])
  return out, upd.get('batch_stats', stats)


def select(pred, on_true, on_false):
  """tree-wise jnp.where; `pred` may be a Python bool."""
  if pred is False:
    return on_false
  return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b),
                                on_true, on_false)


def pmean(tree, axis_name):
  """The mean of `tree` over the devices of `axis_name`; `tree` itself when
  the step runs unmapped (`axis_name` None)."""
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def adam_step(tx, grads, opt_state, params):
  """One update of `tx` (an optax transformation): (new params, new state)."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def chain_stats(start, *returned):
  """Running statistics after several train-mode calls in order, each of
  which was run from `start` and returned `returned[i]`.

  A call's update r -> keep * r + (1 - keep) * s is linear, so calls can run
  from the same statistics (inside one VJP, or reused) and be chained here:
  after call i, r_i = ret_i + keep * (r_(i-1) - r), so r_1 = ret_1 exactly.
  """
  keep = 1.0 - models.BN_MOMENTUM
  def chain(r, *rets):
    cur = r
    for ret in rets:
      cur = ret + keep * (cur - r)
    return cur
  return jax.tree_util.tree_map(chain, start, *returned)


def warmup_phase(state, config, dtype):
  """(warmup, phase): `warmup` is a traced bool (or False without warm-up);
  `phase(warm, adv)` picks a weight by it, as a `dtype` scalar. Weights, not
  `lax.cond`, select the phase: one compiled function, and XLA:CPU stays
  fast (a conditional made the step 15x slower there)."""
  if not config.num_vae_steps:
    return False, lambda warm, adv: jnp.asarray(adv, dtype)
  warmup = state.step < config.num_vae_steps
  return warmup, lambda warm, adv: jnp.where(warmup, warm, adv).astype(dtype)


def compute_dtype(config):
  """`config.dtype` promoted to at least float32: the dtype of the step's
  inputs, loss weights and sums (a bfloat16 run computes its convolutions
  in bfloat16 and keeps these float32; a float64 run stays float64)."""
  return jnp.promote_types(jnp.dtype(config.dtype), jnp.float32)
