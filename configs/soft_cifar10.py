"""Soft-IntroVAE's CIFAR-10 recipe (taldatech/soft-intro-vae-pytorch b6dbf16).

Their README's command: `--dataset cifar10 --lr 2e-4 --num_epochs 250
--beta_kl 1.0 --beta_rec 1.0 --beta_neg 256 --z_dim 128 --batch_size 32`;
their network for 32 px (`train_soft_intro_vae.py` l. 376-380): widths
(64, 128, 256), their residual block (`bn2` before the add, a 1x1 skip
convolution only where the widths differ: `reference_layout=False`). No
warm-up, no flips (`ToTensor` only), Adam (0.9, 0.999) at 2e-4 for both
networks. Their `MultiStepLR` steps at epoch 350 (l. 453-454), after the
250 epochs run: never, so no `lr_boundaries` (a longer run adds
`--config.lr_boundaries='(547050,)'`, epoch 350 of 1,563 steps).

Data: TFDS `cifar10` (50,000 training images; `tfds build cifar10
--data_dir=...` once, then `--config.data_dir=...`).
"""

from introvae_jax.configuration import base_config

TRAIN_IMAGES = 50_000


def get_config():
  c = base_config()
  c.dataset = 'cifar10'
  c.image_size = 32
  c.channels = (64, 128, 256)
  c.hdim = 128
  c.residual_block, c.reference_layout = 'soft_introvae', False
  c.init = 'pytorch'  # torch's default initialisation, as theirs
  c.random_flip = False
  c.objective = 'soft_introvae'
  c.soft_introvae.update(beta_rec=1.0, beta_kl=1.0, beta_neg=256.0)
  c.batch_size = 32
  c.lr_e = c.lr_g = 2e-4
  c.num_vae_steps = 0
  steps_per_epoch = -(-TRAIN_IMAGES // c.batch_size)  # no drop_last: 1,563
  c.num_train_steps = 250 * steps_per_epoch
  c.image_every_steps = 5000
  c.checkpoint_every_steps = 10000
  return c
