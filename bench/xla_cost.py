"""FLOPs and memory of a compiled XLA computation, from XLA's own analyses."""


def flops(compiled) -> float:
  """FLOPs XLA's cost analysis counts for one call (a multiply-add is 2)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per computation.
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def memory_mib(compiled) -> dict:
  """Buffers XLA plans for one call, MiB: arguments, outputs, temporaries."""
  m = compiled.memory_analysis()
  mib = lambda b: b / 2 ** 20
  return dict(arguments=mib(m.argument_size_in_bytes),
              outputs=mib(m.output_size_in_bytes),
              temporaries=mib(m.temp_size_in_bytes))


def model_flops(config, batch: int) -> dict:
  """Forward FLOPs of the encoder and decoder on `batch` examples, and the
  reference step's model FLOPs from them (docs: introvae.md 3c).

  A backward pass w.r.t. parameters costs about two forwards (weight and
  activation gradients), one w.r.t. inputs only about one. The step runs the
  decoder twice forward and backward (2 x 3), plus one more activation-gradient
  pass through the reconstruction call (the E step needs d/dz before the G
  step's cotangent exists); the encoder on real images and on the two fakes
  forward and backward w.r.t. parameters (3 x 3), and the updated encoder on
  the fakes forward and backward w.r.t. inputs (2 x 2): 7 decoder + 13
  encoder forwards. (The PyTorch reference loop: 8 + 13.)
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from introvae_jax import checkpointing, models  # pylint: disable=g-import-not-at-top

  encoder, decoder = models.build_models(config)
  state = checkpointing.abstract_state(config)
  x = jax.ShapeDtypeStruct((batch,) + models.input_shape(config), jnp.float32)
  z = jax.ShapeDtypeStruct((batch, config.hdim), jnp.float32)
  def forward(module, params, stats, inputs):
    fn = jax.jit(lambda p, s, a: module.apply(
        {'params': p, 'batch_stats': s}, a, train=True, mutable=['batch_stats']))
    return flops(fn.lower(params, stats, inputs).compile())

  f_e = forward(encoder, state.params_e, state.batch_stats_e, x)
  f_g = forward(decoder, state.params_g, state.batch_stats_g, z)
  return dict(encoder_forward=f_e, decoder_forward=f_g,
              step=13 * f_e + 7 * f_g)
