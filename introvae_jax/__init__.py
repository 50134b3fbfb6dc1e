"""IntroVAE (Huang et al., NeurIPS 2018) and Soft-IntroVAE in JAX/Flax.

Public API::

  from introvae_jax import base_config, create_train_state, train_step
  from introvae_jax import make_mesh, make_train_step, global_batch

The modules, by concern (imports run downwards only):

- model, objective and step: `configuration`, `models`, `losses`,
  `objectives` (one module per objective: `introvae`, `soft_introvae`,
  `vae`; the registry `config.objective` picks from), `step` (`TrainState`,
  the pure `train_step` around the objective, `make_train_step`),
  `parallel` (the device mesh, global arrays, input prefetch), `errors`;
- the training program: `train` (`main.py`), `checkpointing`, `workdir`,
  `stopping` (stop signals), `cache`, `cli`, and the tools `generate`,
  `compare`, `toy2d`;
- data: `input_pipeline` (TFDS, image folders, built-in offline sets),
  `offline_datasets`;
- evaluation: `evaluation` (SWD, FID/KID, reconstruction, the CLI),
  `inception`, `digit_classifier`, `sampling`, `files`;
- PyTorch interop: `torch_reference` (the authors' model, for parity tests),
  `convert` (their checkpoints to ours);
- hardware: `hardware` (chip peaks, model FLOPs, MFU), `plan` (the step
  compiled for a TPU topology on any host: memory, roofline, fit).
"""

from introvae_jax import objectives
from introvae_jax.configuration import (base_config, check_batch_divides,
                                        validate)
from introvae_jax.losses import (decoder_loss, encoder_loss, kl_divergence,
                                 reconstruction_loss, reparameterize, vae_loss)
from introvae_jax.models import (BatchNorm, Decoder, Encoder, MLPDecoder,
                                 MLPEncoder, ResidualBlock, build_models,
                                 channels_for, image_size_for)
from introvae_jax.parallel import (global_batch, local_copy, make_mesh,
                                   prefetch_to_mesh, put_replicated)
from introvae_jax.step import (AXIS_NAME, TrainState, abstract_train_state,
                               create_train_state, draw_noise, make_optimizers,
                               make_train_step, replicate, shard_batch,
                               train_step, unreplicate)

__version__ = '0.3.0'
