"""FFHQ at 1024x1024. No official IntroVAE FFHQ recipe exists: this starts
from the authors' 1024 CelebA-HQ recipe (celebahq1024.py).

Data: a folder of FFHQ images (PNG/JPEG, searched recursively):
`--config.data_dir=/path/to/ffhq/images1024x1024`, or a prepared TFDS data
set by name with `--config.dataset=NAME`.
"""

try:  # the recipes as the package carries them (installed, or editable)
  from introvae_jax.configs import celebahq1024
except ModuleNotFoundError:  # a checkout imported without an install
  from configs import celebahq1024

NUM_IMAGES = 70_000


def get_config():
  c = celebahq1024.get_config()
  c.dataset = 'folder'
  c.data_dir = ''                  # required: the FFHQ image folder
  num_vae_epochs = 4
  c.num_vae_steps = num_vae_epochs * NUM_IMAGES // c.batch_size
  c.num_train_steps = 200 * NUM_IMAGES // c.batch_size
  return c
