"""Quick overfit/demo run: the 100 real LFW faces of skimage, 32x32 grayscale."""

from introvae_jax.configuration import base_config


def get_config():
  c = base_config()
  c.dataset = 'faces_offline'
  c.image_size = 32
  c.image_channels = 1
  c.channels = (16, 32, 64)
  c.hdim = 32
  c.batch_size = 20
  c.m_plus = 60.0
  c.weight_rec = 0.5
  c.num_vae_steps = 100
  c.num_train_steps = 1000
  c.log_every_steps = 20
  c.image_every_steps = 200
  c.checkpoint_every_steps = 250
  c.num_image_samples = 20
  return c
