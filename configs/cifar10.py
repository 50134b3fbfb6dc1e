"""TFDS `cifar10` at 32x32 with the reference widths for 32 px.

Prepare the data once with `tfds build cifar10 --data_dir=...` (nothing is
downloaded at training time), then pass `--config.data_dir=...`.
"""

from introvae_jax.configuration import base_config
from introvae_jax.models import channels_for


def get_config():
  c = base_config()
  c.dataset = 'cifar10'
  c.image_size = 32
  c.channels = channels_for(32)
  c.hdim = 128
  c.batch_size = 64
  c.m_plus = 120.0
  c.weight_rec = 0.05
  c.weight_neg = 0.5
  c.num_vae_steps = 0
  c.num_train_steps = 100_000
  c.image_every_steps = 2000
  c.checkpoint_every_steps = 5000
  return c
