"""float32 accuracy on the code paths of other x86 CPUs.

XLA:CPU compiles for the host's instruction set, so a CI machine with AVX-512
never runs the code an AVX2-only CPU (e.g. AMD Zen 3) or an older one runs,
and float32 rounds differently there. These tests recompile in a child process
with `--xla_cpu_max_isa` (conftest `in_subprocess`; float64 enabled for the
reference) and check, on the parity iteration test's model and real batch,
the encoder's gradient of the KL term in float32 against float64: no
LeakyReLU input on the other side of the kink, every parameter's gradient
within 1e-5 relative (the parity test's bound). The failure they guard
against (test_parity_torch KINK_MARGIN): with that test's former draws one
BatchNorm output 1.6e-7 below zero came out above zero in float32 on AVX2
code, and this check gave 7e-3 (the parity test 1e-3) instead of 2e-6.
"""

import functools
import platform

import jax
import jax.numpy as jnp
import pytest

from introvae_jax import losses, models
from conftest import in_subprocess
from test_parity_torch import (ITERATION_DRAWS_SEED, ITERATION_OVERRIDES,
                               KINK_MARGIN, draws, jax_state, rel_err,
                               small_config)

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ('x86_64', 'amd64'),
    reason='--xla_cpu_max_isa values are x86 instruction sets')


def _isa(name):
  return in_subprocess(f'isa_{name.lower()}', {
      'XLA_FLAGS': f'--xla_cpu_max_isa={name}', 'JAX_ENABLE_X64': '1',
      'JAX_PLATFORMS': 'cpu'})


def _kl_gradient(encoder, params, stats, x):
  """d KL(real batch) / d params, and every BatchNorm output (the encoder's
  LeakyReLU inputs)."""
  def kl(params):
    (mu, logvar), upd = encoder.apply(
        {'params': params, 'batch_stats': stats}, x, train=True,
        mutable=['batch_stats', 'intermediates'],
        capture_intermediates=lambda m, _: isinstance(m, models.BatchNorm))
    return losses.kl_divergence(mu, logvar).mean(), upd['intermediates']
  return jax.grad(kl, has_aux=True)(params)


def _check_encoder_gradient():
  assert jax.config.jax_enable_x64, 'needs JAX_ENABLE_X64=1'
  config = small_config(**ITERATION_OVERRIDES)
  state = jax_state(config)
  x = draws(config, 1, seed=ITERATION_DRAWS_SEED)[0][0]
  out = {}
  for dtype in ('float32', 'float64'):
    encoder, _ = models.build_models(
        small_config(dtype=dtype, **ITERATION_OVERRIDES))
    cast = lambda tree, d=dtype: jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, d), tree)
    grads, acts = jax.jit(functools.partial(_kl_gradient, encoder))(
        cast(state.params_e), cast(state.batch_stats_e), cast(x))
    out[dtype] = grads, jax.tree_util.tree_leaves(acts)
  (g32, a32), (g64, a64) = out['float32'], out['float64']
  assert len(a64) == 7, len(a64)
  closest = min(float(jnp.min(jnp.abs(a))) for a in a64)
  assert closest > KINK_MARGIN, closest
  flips = sum(int(jnp.sum((a >= 0) != (b >= 0))) for a, b in zip(a32, a64))
  assert flips == 0, f'{flips} LeakyReLU inputs changed sign in float32'
  errs = jax.tree_util.tree_map(rel_err, g32, g64)
  worst = max(jax.tree_util.tree_leaves_with_path(errs), key=lambda kv: kv[1])
  assert worst[1] < 1e-5, (jax.tree_util.keystr(worst[0]), worst[1])


@_isa('AVX2')
def test_encoder_gradient_in_float32_with_avx2_code():
  _check_encoder_gradient()


@pytest.mark.slow  # AVX2, the oldest ISA of current x86 servers, is fast
@_isa('SSE4_2')
def test_encoder_gradient_in_float32_with_sse4_2_code():
  _check_encoder_gradient()
