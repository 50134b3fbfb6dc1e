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

