"""Quick overfit/demo run: the 100 real LFW faces of skimage, 32x32 grayscale.

The offline default's model and objective on another built-in set, tuned
(docs/tuning.md): m_plus 20 (best SWD of 10, 15, 20, 25 at 1,000 steps) and
2,000 steps (at 1,000 the seeds spread too widely to tell the objectives
apart).
"""

try:  # the recipes as the package carries them (installed, or editable)
  from introvae_jax.configs import default
except ModuleNotFoundError:  # a checkout imported without an install
  from configs import default


def get_config():
  c = default.get_config()
  c.dataset = 'faces_offline'
  c.random_flip = True
  c.eval_split_fraction = 0.0   # overfit demo: train on all 100 faces
  c.eval_every_steps = 0
  c.batch_size = 20
  c.num_vae_steps = 100
  c.m_plus = 20.0
  c.num_train_steps = 2000
  c.log_every_steps = 20
  c.image_every_steps = 200
  c.checkpoint_every_steps = 250
  c.num_image_samples = 20
  return c
