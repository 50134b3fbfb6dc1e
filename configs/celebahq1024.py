"""The authors' 1024x1024 CelebA-HQ recipe (`run_1024.sh`).

Data: TFDS `celeb_a_hq/1024` (manual download, see celebahq256.py) or
`--config.dataset=folder --config.data_dir=/path/to/celebahq1024`.
"""

from introvae_jax.configuration import base_config
from introvae_jax.models import channels_for

NUM_IMAGES = 30_000


def get_config():
  c = base_config()
  c.dataset = 'celeb_a_hq/1024'
  c.image_size = 1024
  c.channels = channels_for(1024)  # (16, 32, 64, 128, 256, 512, 512, 512)
  c.hdim = 512
  c.init = 'pytorch'               # torch's default initialisation, as theirs
  c.batch_size = 12                # reference: 12 over 4 GPUs
  # 3 images per 16 GiB v5e chip (docs/tpu.md, "Where the bytes go"): the
  # 16- to 64-channel maps at 256-1024 px packed 4x4 (space_to_depth, exact
  # up to rounding) fill the TPU's 128-lane tiles: 8.2 GiB at the peak
  # without remat (the plain layout needed 15.9 of 15.75 GiB, 14.0 with
  # remat) and 2.0x the plain layout's images/s bound (3.7x by the HBM
  # arrays' traffic). Float32 products as one bfloat16 pass on TPUs (TF32 on
  # GPUs): the 1024 px step is bound by memory traffic, not by the MXU.
  c.space_to_depth = 4
  c.remat = False
  c.precision = 'default'
  c.m_plus = 500.0
  c.weight_rec = 0.01
  c.weight_kl = 1.0
  c.weight_neg = 1.0
  num_vae_epochs = 4               # reference --num_vae 4 (epochs)
  c.num_vae_steps = num_vae_epochs * NUM_IMAGES // c.batch_size
  c.num_train_steps = 500 * NUM_IMAGES // c.batch_size
  c.image_every_steps = 2000
  c.checkpoint_every_steps = 5000
  c.num_image_samples = 12
  return c
