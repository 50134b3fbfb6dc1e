"""The config schema: every field with its default, and validation.

Recipe files in `configs/` start from `base_config()` and change a few fields.
The returned ConfigDict is locked, so a misspelled field raises at once.
Field names follow the reference code (`m_plus`, `weight_rec`, ...).
"""

import json

from etils import epath
import jax
import ml_collections

from introvae_jax.errors import ConfigError

MODES = ('reference', 'fused')
ARCHS = ('conv', 'mlp')
DTYPES = ('float32', 'bfloat16', 'float64')  # bfloat16: mixed precision.


def base_config() -> ml_collections.ConfigDict:
  """All fields with defaults (the 64 px reference-widths model)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Model (reference `networks.py`).
  c.arch = 'conv'               # 'conv' (images) or 'mlp' (2-D toy data).
  c.image_size = 64
  c.channels = (128, 256, 512, 512)
  c.image_channels = 3
  c.hdim = 512
  c.reference_layout = True     # extra 1x1 conv on 512->512 blocks (checkpoints).
  c.dtype = 'float32'           # computation dtype ('bfloat16': params, optimiser
                                # state, BN statistics and losses stay float32).
  c.conv_impl = 'xla'           # 'xla' (every backend) or 'im2col' (a CPU lever).
  c.remat = False               # recompute block activations in the backward.
  c.data_dim = 2                # mlp only
  c.mlp_hidden = (256, 256, 256)

  # Objective (reference `main.py` flags).
  c.mode = 'reference'          # 'reference' (exact) or 'fused' (one pass).
  c.m_plus = 120.0
  c.weight_rec = 0.05
  c.weight_kl = 1.0
  c.weight_neg = 0.5
  c.num_vae_steps = 0           # plain-VAE warm-up steps (reference: num_vae epochs).
  c.vae_weight_rec = 1.0        # warm-up loss vae_weight_rec*L_AE + vae_weight_kl*KL
  c.vae_weight_kl = 1.0         # (reference: 1 and 1; compare's betavae: the recipe's).

  # Optimisers: two Adams, no schedule, no clipping, no weight decay.
  c.lr_e = 2e-4
  c.lr_g = 2e-4
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8

  # Batch and devices.
  c.batch_size = 16             # global batch, over all devices and hosts.
  c.sync_batch_stats = False    # reference multi-GPU runs do not sync BN.
  # Multi-process runs (TPU pods, multi-node GPU): jax.distributed.initialize(),
  # also done when JAX_COORDINATOR_ADDRESS is set. '' / -1: detected (TPU,
  # SLURM, Open MPI) or taken from JAX's environment variables.
  c.distributed = False
  c.coordinator_address = ''    # 'host:port' of process 0.
  c.num_processes = -1
  c.process_id = -1

  # Data.
  c.dataset = 'mnist_offline'   # TFDS name, 'folder', or a built-in offline set.
  c.data_dir = ''               # TFDS data_dir, or the image folder for 'folder'.
  c.split = 'train'
  c.manual_dir = ''             # TFDS manual_dir (CelebA-HQ).
  c.random_flip = True
  c.shuffle_buffer = 10_000
  c.on_corrupt_image = 'skip'   # 'skip' (warn and count) or 'error'.
  c.eval_split_fraction = 0.0   # folder/offline sets: held-out fraction.

  # Training loop.
  c.num_train_steps = 1000
  c.log_every_steps = 50
  c.image_every_steps = 500
  c.checkpoint_every_steps = 1000
  c.max_to_keep = 3
  c.num_image_samples = 64
  c.on_nonfinite = 'stop'       # 'stop' (keep last good checkpoint) or 'skip'.

  # Evaluation during training (introvae_jax.evaluation), written to TensorBoard.
  c.eval_every_steps = 0        # 0: off.
  c.eval_num_images = 1000
  c.fid_weights = ''            # pt_inception-2015-12-05-6726825d.pth (FID/KID).
  c.digit_classifier = ''       # digit CNN weights (mnist_offline); '' = cache.

  # Resuming: identity fields (all but FREE_ON_RESUME) that may differ from the
  # run's stored config.json, comma-separated, e.g. 'dataset,batch_size'.
  c.allow_changes = ''
  return c.lock()


# Fields a resumed run may change without `allow_changes`: how long to train,
# what to log and how, and how to compute the same numbers. Every other field
# is part of the run's identity (data, model, objective, optimiser, batch,
# mode, dtype, seed) and is checked against the stored config.json.
FREE_ON_RESUME = frozenset({
    'num_train_steps', 'log_every_steps', 'image_every_steps',
    'checkpoint_every_steps', 'max_to_keep', 'num_image_samples',
    'on_nonfinite', 'on_corrupt_image', 'eval_every_steps', 'eval_num_images',
    'fid_weights', 'digit_classifier', 'conv_impl', 'remat', 'distributed',
    'coordinator_address', 'num_processes', 'process_id', 'allow_changes',
})


def allowed_changes(config) -> frozenset:
  return frozenset(n.strip() for n in config.allow_changes.split(',')
                   if n.strip())


def identity_changes(stored, config):
  """[(field, stored value, new value)] of identity fields that differ."""
  return [(name, stored[name], config[name]) for name in sorted(config)
          if name not in FREE_ON_RESUME and name in stored
          and _normalised(stored[name]) != _normalised(config[name])]


def _normalised(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def check_resume(stored, config, where: str):
  """The identity changes `config.allow_changes` permits; ConfigError for any
  other, listing each changed field with its stored and new value."""
  changes = identity_changes(stored, config)
  refused = [c for c in changes if c[0] not in allowed_changes(config)]
  if refused:
    listed = '; '.join(f'{n}: {old!r} -> {new!r}' for n, old, new in refused)
    names = ','.join(n for n, _, _ in refused)
    raise ConfigError(
        f'Refusing to resume {where} with a different run identity ({listed}). '
        f'Nothing was written. Use a new --workdir, drop the override, or pass '
        f'--config.allow_changes={names} to continue this run with the change '
        '(the old config.json is kept as config.<step>.json).')
  return changes


def read_json(path: str) -> dict:
  """The fields of a run's saved `config.json`, as stored."""
  try:
    saved = json.loads(epath.Path(path).read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f'{path} is not valid JSON ({e}); restore it from '
                      'config.<step>.json beside it or rewrite it.') from e
  if not isinstance(saved, dict):
    raise ConfigError(f'{path} does not hold a config (a JSON object).')
  return saved


def load_json(path: str) -> ml_collections.ConfigDict:
  """A run's saved `config.json` (written by the training loop), locked."""
  saved = read_json(path)
  config = base_config()
  unknown = sorted(set(saved) - set(config))
  if unknown:
    raise ConfigError(f'{path} has fields this version does not know: '
                      f'{unknown}; use the introvae-jax version that wrote it.')
  with config.unlocked():
    for name, value in saved.items():
      config[name] = tuple(value) if isinstance(value, list) else value
  return config


def validate(config) -> None:
  """Raises ValueError naming the field and the fix for an inconsistent config."""
  def fail(msg):
    raise ConfigError(f'Invalid config: {msg}')

  if config.arch not in ARCHS:
    fail(f'arch={config.arch!r}; use one of {ARCHS}.')
  if config.mode not in MODES:
    fail(f'mode={config.mode!r}; use one of {MODES}.')
  if config.conv_impl not in ('xla', 'im2col'):
    fail(f"conv_impl={config.conv_impl!r}; use 'xla' or 'im2col'.")
  if config.dtype not in DTYPES:
    fail(f'dtype={config.dtype!r}; use one of {DTYPES}.')
  if config.dtype == 'float64' and not jax.config.jax_enable_x64:
    fail("dtype='float64' needs 64-bit JAX, which is off: set "
         'JAX_ENABLE_X64=1 in the environment (main.py does it for you), or '
         "call jax.config.update('jax_enable_x64', True) before any array is "
         'made.')
  if config.arch == 'conv':
    size, chans = config.image_size, tuple(config.channels)
    if size < 8 or size & (size - 1):
      fail(f'image_size={size} is not 4 * 2**n (8, 16, 32, ... 1024).')
    if 4 * 2 ** len(chans) != size:
      fail(f'image_size={size} does not match channels={chans}: the model '
           f'downsamples len(channels)={len(chans)} times to 4x4, so it needs '
           f'image_size={4 * 2 ** len(chans)} (or set channels to '
           f'introvae_jax.channels_for({size})).')
    if config.image_channels not in (1, 3):
      fail(f'image_channels={config.image_channels}; use 1 or 3.')
  if config.batch_size < 1:
    fail(f'batch_size={config.batch_size} must be positive.')
  _validate_distributed(config, fail)
  for name in ('lr_e', 'lr_g', 'weight_rec', 'weight_kl', 'weight_neg', 'm_plus',
               'vae_weight_rec', 'vae_weight_kl'):
    if config[name] < 0:
      fail(f'{name}={config[name]} must be >= 0.')
  if config.num_vae_steps < 0:
    fail(f'num_vae_steps={config.num_vae_steps} must be >= 0.')
  if config.on_nonfinite not in ('stop', 'skip'):
    fail(f"on_nonfinite={config.on_nonfinite!r}; use 'stop' or 'skip'.")
  unknown = sorted(allowed_changes(config) - set(config))
  if unknown:
    fail(f'allow_changes names unknown fields {unknown}; give config field '
         "names separated by commas, e.g. 'dataset,batch_size'.")
  if config.on_corrupt_image not in ('skip', 'error'):
    fail(f"on_corrupt_image={config.on_corrupt_image!r}; use 'skip' or 'error'.")


def _validate_distributed(config, fail) -> None:
  num, pid = config.num_processes, config.process_id
  given = [name for name, unset in (('coordinator_address', ''),
                                    ('num_processes', -1), ('process_id', -1))
           if config[name] != unset]
  if given and not config.distributed:
    fail(f'{", ".join(given)} set but distributed=False; set '
         '--config.distributed=True for a multi-process run.')
  if num == 0 or num < -1:
    fail(f'num_processes={num} must be >= 1, or -1 to detect it.')
  if pid < -1 or 0 < num <= pid:
    fail(f'process_id={pid} must be in [0, num_processes={num}), or -1 to '
         'detect it.')


def check_batch_divides(global_batch: int, num_devices: int) -> int:
  """Per-device batch size, or a clear error when it does not divide."""
  if global_batch % num_devices:
    lo = global_batch - global_batch % num_devices
    raise ConfigError(
        f'batch_size={global_batch} does not divide over {num_devices} devices; '
        f'use a multiple of {num_devices} (e.g. --config.batch_size='
        f'{lo or num_devices} or {lo + num_devices}).')
  return global_batch // num_devices
