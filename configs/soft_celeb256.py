"""Soft-IntroVAE's `celeb256` recipe (taldatech/soft-intro-vae-pytorch
b6dbf16).

Their network for 256 px (`train_soft_intro_vae.py` l. 393-404): widths
(64, 128, 256, 512, 512, 512), their residual block (`bn2` before the add,
a 1x1 skip convolution only where the widths differ: `reference_layout=
False`), z 256, batch 8, beta_neg 1024, Adam (0.9, 0.999) at 2e-4, no
warm-up, random mirroring (`is_mirror=True`).

beta_kl / beta_rec: their README's table says 0.5 / 1.0, their `main.py`
docstring 1.0 / 0.5. This recipe takes **beta_kl 1.0, beta_rec 0.5**: it is
the one of the two that obeys the rule their README states next to the
table ("it is usually better to choose beta_kl >= beta_rec"), as every
other recommendation of theirs does (images and 2-D); the table row is the
only exception.

Data: theirs is CelebA (`img_align_celeba`, the first 162,770 files of a
directory listing), not CelebA-HQ, despite the name. Here: TFDS `celeb_a`,
whose train split is the official 162,770 images (`tfds build celeb_a`
needs the files placed by hand), or `--config.dataset=folder
--config.data_dir=...`. Two deviations: their loader resizes the whole
178x218 frame to 256x256 (a vertical squeeze); this pipeline centre-crops
the square and resizes it (no distortion); and the official split, not a
listing order. Their README gives no epoch count for it; `main.py`'s
default is 250 epochs (20,347 steps each), kept here.
"""

from introvae_jax.configuration import base_config

TRAIN_IMAGES = 162_770


def get_config():
  c = base_config()
  c.dataset = 'celeb_a'
  c.image_size = 256
  c.channels = (64, 128, 256, 512, 512, 512)
  c.hdim = 256
  c.residual_block, c.reference_layout = 'soft_introvae', False
  c.init = 'pytorch'  # torch's default initialisation, as theirs
  c.random_flip = True
  c.objective = 'soft_introvae'
  c.soft_introvae.update(beta_rec=0.5, beta_kl=1.0, beta_neg=1024.0)
  c.batch_size = 8
  c.lr_e = c.lr_g = 2e-4
  c.num_vae_steps = 0
  steps_per_epoch = -(-TRAIN_IMAGES // c.batch_size)
  c.num_train_steps = 250 * steps_per_epoch
  c.image_every_steps = 5000
  c.checkpoint_every_steps = 10000
  c.num_image_samples = 16
  return c
