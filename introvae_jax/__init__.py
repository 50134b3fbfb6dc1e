"""IntroVAE (Huang et al., NeurIPS 2018) and Soft-IntroVAE in JAX/Flax.

Public API (`__all__`)::

  from introvae_jax import base_config, create_train_state, train_step
  from introvae_jax import make_mesh, make_train_step, global_batch
  from introvae_jax import load_recipe, recipe_path

It needs only the core dependencies (jax, flax, optax, ml_collections,
absl-py, etils, numpy); the training program and the tools need the `train`
extra and TensorFlow (`introvae_jax.extras`).

The modules, by concern (imports run downwards only):

- model, objective and step: `configuration`, `models`, `losses`,
  `objectives` (one module per objective: `introvae`, `soft_introvae`,
  `vae`; the registry `config.objective` picks from), `step` (`TrainState`,
  the pure `train_step` around the objective, `make_train_step`),
  `parallel` (the device mesh, global arrays, input prefetch), `errors`;
- the training program: `train` (`python -m introvae_jax`, `main.py`),
  `checkpointing`, `workdir`, `stopping` (stop signals), `cache`, `cli`,
  and the tools `generate`, `compare`, `toy2d`;
- recipes and installation: `recipes` (a recipe's file by name; the wheel
  carries `configs/` as `introvae_jax.configs`), `extras` (which extra
  installs a missing dependency);
- data: `input_pipeline` (TFDS, image folders, built-in offline sets),
  `offline_datasets`;
- evaluation: `evaluation` (SWD, FID/KID, reconstruction, the CLI),
  `inception`, `digit_classifier`, `sampling`, `files`;
- PyTorch interop: `convert` (the authors' checkpoints to ours and back;
  the PyTorch restatement the parity tests run is `tests/torch_reference.py`,
  outside the package);
- hardware: `hardware` (chip peaks, model FLOPs, MFU), `plan` (the step
  compiled for a TPU topology on any host: memory, roofline, fit).
"""

# The one place the version is written (pyproject.toml reads it).
__version__ = '0.3.0'

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
from introvae_jax.recipes import load_recipe, recipe_names, recipe_path

__all__ = [
    # configuration and recipes
    'base_config', 'validate', 'check_batch_divides', 'load_recipe',
    'recipe_names', 'recipe_path',
    # models
    'Encoder', 'Decoder', 'ResidualBlock', 'BatchNorm', 'MLPEncoder',
    'MLPDecoder', 'build_models', 'channels_for', 'image_size_for',
    # losses
    'kl_divergence', 'reconstruction_loss', 'reparameterize', 'encoder_loss',
    'decoder_loss', 'vae_loss',
    # the train step
    'TrainState', 'create_train_state', 'abstract_train_state', 'train_step',
    'make_train_step', 'make_optimizers', 'draw_noise', 'AXIS_NAME',
    'objectives',
    # the device mesh and pmap
    'make_mesh', 'global_batch', 'prefetch_to_mesh', 'put_replicated',
    'local_copy', 'replicate', 'shard_batch', 'unreplicate',
]
