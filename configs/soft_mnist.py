"""Soft-IntroVAE's MNIST recipe (taldatech/soft-intro-vae-pytorch b6dbf16).

Their README's command: `--dataset mnist --lr 2e-4 --num_epochs 200
--beta_kl 1.0 --beta_rec 1.0 --beta_neg 256 --z_dim 32 --batch_size 128`;
their network for 28 px (`train_soft_intro_vae.py` l. 429-438): widths
(64, 128), so the encoder ends on a 7x7 map and the decoder starts from one
(`base_size=7`), their residual block (`bn2` before the add, a 1x1 skip
convolution only where the widths differ: `reference_layout=False`).
No warm-up (`--num_vae` 0), no flips (`ToTensor` only), Adam (0.9, 0.999) at
2e-4 for both networks. Their `MultiStepLR` steps at epoch 350, after the
200 epochs run: never, so no `lr_boundaries`.

Data: TFDS `mnist` (60,000 training digits; `tfds build mnist
--data_dir=...` once, then `--config.data_dir=...`). FashionMNIST is the
same recipe with `--config.dataset=fashion_mnist`.
"""

from introvae_jax.configuration import base_config

TRAIN_IMAGES = 60_000


def get_config():
  c = base_config()
  c.dataset = 'mnist'
  c.image_size, c.image_channels = 28, 1
  c.channels, c.base_size = (64, 128), 7
  c.hdim = 32
  c.residual_block, c.reference_layout = 'soft_introvae', False
  c.init = 'pytorch'  # torch's default initialisation, as theirs
  c.random_flip = False
  c.objective = 'soft_introvae'
  c.soft_introvae.update(beta_rec=1.0, beta_kl=1.0, beta_neg=256.0)
  c.batch_size = 128
  c.lr_e = c.lr_g = 2e-4
  c.num_vae_steps = 0
  steps_per_epoch = -(-TRAIN_IMAGES // c.batch_size)  # no drop_last: 469
  c.num_train_steps = 200 * steps_per_epoch
  c.image_every_steps = 2000
  c.checkpoint_every_steps = 5000
  return c
