"""The authors' 256x256 CelebA-HQ recipe (`run_256.sh`).

Data: TFDS `celeb_a_hq/256` (needs a manual download: put the files in
`--config.manual_dir` and run `tfds build celeb_a_hq/256`), or a folder of
images: `--config.dataset=folder --config.data_dir=/path/to/celebahq256`.
"""

from introvae_jax.configuration import base_config
from introvae_jax.models import channels_for

NUM_IMAGES = 30_000


def get_config():
  c = base_config()
  c.dataset = 'celeb_a_hq/256'
  c.image_size = 256
  c.channels = channels_for(256)   # (32, 64, 128, 256, 512, 512)
  c.hdim = 512
  c.init = 'pytorch'               # torch's default initialisation, as theirs
  c.space_to_depth = 2             # the 32-channel 256 px maps fill 128 lanes
  c.batch_size = 16                # reference: 16 on 1 GPU
  c.m_plus = 120.0
  c.weight_rec = 0.05
  c.weight_kl = 1.0
  c.weight_neg = 0.5
  num_vae_epochs = 0
  c.num_vae_steps = num_vae_epochs * NUM_IMAGES // c.batch_size
  c.num_train_steps = 500 * NUM_IMAGES // c.batch_size
  c.image_every_steps = 2000
  c.checkpoint_every_steps = 5000
  c.num_image_samples = 16
  return c
