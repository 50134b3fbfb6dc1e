"""FFHQ at 256x256: the authors' 1024 recipe's objective (margin, weights,
VAE warm-up) on the reference 256 px widths. No official FFHQ recipe exists.

Data: `--config.data_dir=/path/to/ffhq` (a folder of images, any size; they
are centre-cropped and resized), or `--config.dataset=NAME` for TFDS.
"""

try:  # the recipes as the package carries them (installed, or editable)
  from introvae_jax.configs import ffhq1024
except ModuleNotFoundError:  # a checkout imported without an install
  from configs import ffhq1024
from introvae_jax.models import channels_for


def get_config():
  c = ffhq1024.get_config()
  c.image_size = 256
  c.channels = channels_for(256)
  c.batch_size = 16
  c.remat = False                  # 256 px fits without recomputation,
  c.precision = 'highest'          # and at the reference-exact precision
  c.space_to_depth = 2             # 4 at 1024 px; 2 fills the lanes here
  c.num_vae_steps = 4 * ffhq1024.NUM_IMAGES // c.batch_size
  c.num_train_steps = 200 * ffhq1024.NUM_IMAGES // c.batch_size
  c.num_image_samples = 16
  return c
