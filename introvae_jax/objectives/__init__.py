"""Training objectives, one module each, chosen by `config.objective`.

Each module follows the contract in `base` (`NOISE`, `FUSED`, `READS`,
`update`); `step.train_step` is the shell around it. To add one: write its
module, register it here (`configuration.OBJECTIVES`, compare's cells and
the contract tests read this registry), give its hyper-parameters a config
namespace with their constraints (`configuration.base_config`,
`CONSTRAINTS`), and test it.
"""

from introvae_jax.objectives import introvae
from introvae_jax.objectives import soft_introvae
from introvae_jax.objectives import vae
from introvae_jax.objectives.base import METRICS, Nets

__all__ = ['METRICS', 'Nets', 'REGISTRY', 'get']

REGISTRY = {
    'vae': vae,
    'introvae': introvae,
    'soft_introvae': soft_introvae,
}


def get(name: str):
  """The objective module registered as `name`."""
  return REGISTRY[name]
