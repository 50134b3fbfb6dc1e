"""IntroVAE (Huang et al., NeurIPS 2018) in JAX/Flax.

Public API::

  from introvae_jax import base_config, create_train_state, train_step
"""

from introvae_jax.configuration import base_config, check_batch_divides, validate
from introvae_jax.losses import (decoder_loss, encoder_loss, kl_divergence,
                                 reconstruction_loss, reparameterize, vae_loss)
from introvae_jax.models import (BatchNorm, Decoder, Encoder, MLPDecoder,
                                 MLPEncoder, ResidualBlock, build_models,
                                 channels_for, image_size_for)
from introvae_jax.step import (AXIS_NAME, TrainState, create_train_state,
                               draw_noise, make_optimizers, make_train_step,
                               replicate, shard_batch, train_step, unreplicate)

__version__ = '0.1.0'
