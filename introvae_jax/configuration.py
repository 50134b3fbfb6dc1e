"""The config schema: every field with its default, and validation.

Recipe files in `configs/` start from `base_config()` and change a few fields.
The returned ConfigDict is locked, so a misspelled field raises at once.
Field names follow the reference code (`m_plus`, `weight_rec`, ...).
`CONSTRAINTS`, beside the schema, says what each field accepts; `validate`
checks every field against it, then the fields that depend on each other.
"""

import dataclasses
import json
import math
import numbers
from typing import Any, Optional, Tuple

from absl import logging
from etils import epath
import jax
import ml_collections

from introvae_jax import models
from introvae_jax import objectives
from introvae_jax.errors import ConfigError

OBJECTIVES = tuple(objectives.REGISTRY)  # config.objective: a registered one
MODES = ('reference', 'fused')
ARCHS = ('conv', 'mlp')
DTYPES = ('float32', 'bfloat16', 'float64')  # bfloat16: mixed precision.
PRECISIONS = ('highest', 'high', 'default')  # jax.lax.Precision, by name.


# --------------------------------------------------------------------------
# Kinds of constraint, for CONSTRAINTS below base_config(). `problem(value)`
# is None for an allowed value, else the rest of the sentence
# "<field>=<value> ...".

def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _type_name(value) -> str:
  return type(value).__name__


@dataclasses.dataclass(frozen=True)
class Int:
  """An int (not a bool) in [low, high]; `special` values (with their
  meaning) are allowed too, e.g. -1: detect it."""
  low: Optional[int] = None
  high: Optional[int] = None
  special: Tuple[Tuple[int, str], ...] = ()
  note: str = ''

  def allowed(self) -> str:
    if self.low is not None and self.high is not None:
      text = f'in [{self.low}, {self.high}]'
    else:
      text = f'>= {self.low}' if self.low is not None else f'<= {self.high}'
    text += ''.join(f', or {v} to {why}' for v, why in self.special)
    return text + (f' ({self.note})' if self.note else '')

  def problem(self, value) -> Optional[str]:
    if not _is_int(value):
      return f'has type {_type_name(value)}; use an int {self.allowed()}'
    if value in dict(self.special):
      return None
    if ((self.low is not None and value < self.low) or
        (self.high is not None and value > self.high)):
      return f'must be {self.allowed()}'
    return None


@dataclasses.dataclass(frozen=True)
class Float:
  """A finite number (ints too, not bools) above `low` and below `high`,
  each bound included unless open."""
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_open: bool = False
  note: str = ''

  def allowed(self) -> str:
    if self.low is not None and self.high is not None:
      text = (f'in {"(" if self.low_open else "["}{self.low:g}, '
              f'{self.high:g}{")" if self.high_open else "]"}')
    elif self.low is not None:
      text = f'finite and {">" if self.low_open else ">="} {self.low:g}'
    else:
      text = f'finite and {"<" if self.high_open else "<="} {self.high:g}'
    return text + (f' ({self.note})' if self.note else '')

  def problem(self, value) -> Optional[str]:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
      return f'has type {_type_name(value)}; use a number {self.allowed()}'
    v = float(value)
    low_ok = self.low is None or (v > self.low if self.low_open
                                  else v >= self.low)
    high_ok = self.high is None or (v < self.high if self.high_open
                                    else v <= self.high)
    if not (math.isfinite(v) and low_ok and high_ok):
      return f'must be {self.allowed()}'
    return None


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of `options` (of their type: 3 is not '3', True is not 1)."""
  options: Tuple[Any, ...]

  def allowed(self) -> str:
    return f'one of {self.options}'

  def problem(self, value) -> Optional[str]:
    if not any(type(value) is type(o) and value == o for o in self.options):  # pylint: disable=unidiomatic-typecheck
      return f'is not allowed; use {self.allowed()}'
    return None


@dataclasses.dataclass(frozen=True)
class Bool:
  """True or False (not 0 or 1)."""

  def allowed(self) -> str:
    return 'True or False'

  def problem(self, value) -> Optional[str]:
    if not isinstance(value, bool):
      return f'has type {_type_name(value)}; use True or False'
    return None


@dataclasses.dataclass(frozen=True)
class Str:
  """A string; `nonempty` refuses ''."""
  nonempty: bool = False

  def allowed(self) -> str:
    return 'a non-empty string' if self.nonempty else 'a string'

  def problem(self, value) -> Optional[str]:
    if not isinstance(value, str):
      return f'has type {_type_name(value)}; use {self.allowed()}'
    if self.nonempty and not value.strip():
      return f'must be {self.allowed()}'
    return None


@dataclasses.dataclass(frozen=True)
class PositiveInts:
  """A non-empty tuple (or list) of ints >= 1, e.g. layer widths;
  `increasing`: strictly increasing, and empty allowed (step boundaries)."""
  increasing: bool = False

  def allowed(self) -> str:
    if self.increasing:
      return ('a tuple of increasing ints >= 1, e.g. (10000, 15000), or () '
              'for none')
    return 'a non-empty tuple of ints >= 1, e.g. (16, 32, 64)'

  def problem(self, value) -> Optional[str]:
    if (not isinstance(value, (tuple, list)) or
        (not value and not self.increasing) or
        not all(_is_int(v) and v >= 1 for v in value) or
        (self.increasing and any(a >= b for a, b in zip(value, value[1:])))):
      return f'must be {self.allowed()}'
    return None


@dataclasses.dataclass(frozen=True)
class FieldNames:
  """Config field names separated by commas ('' for none)."""

  def allowed(self) -> str:
    return "config field names separated by commas, e.g. 'dataset,batch_size'"

  def problem(self, value) -> Optional[str]:
    if not isinstance(value, str):
      return f'has type {_type_name(value)}; use {self.allowed()}'
    unknown = sorted(_names(value) - set(CONSTRAINTS))
    if unknown:
      return f'names unknown fields {_shown(unknown)}; give {self.allowed()}'
    return None


def base_config() -> ml_collections.ConfigDict:
  """All fields with defaults (the 64 px reference-widths model)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Model (reference `networks.py`).
  c.arch = 'conv'               # 'conv' (images) or 'mlp' (2-D toy data).
  c.image_size = 64
  c.channels = (128, 256, 512, 512)
  c.image_channels = 3
  c.base_size = 4               # side of the smallest map: image_size is
                                # base_size * 2**len(channels) (7: the
                                # 28 px MNIST networks of Soft-IntroVAE).
  c.hdim = 512
  c.reference_layout = True     # extra 1x1 conv on 512->512 blocks
                                # (checkpoints).
  c.residual_block = 'introvae'  # BN after the skip add; 'soft_introvae':
                                 # bn2 before it (Soft-IntroVAE's networks).
  c.init = 'flax'               # conv/dense parameters at the start: flax's
                                # defaults, or 'pytorch' (torch's, which the
                                # authors' code keeps: models.initializers).
  c.dtype = 'float32'           # computation dtype ('bfloat16': params,
                                # optimiser state, BN statistics and losses
                                # stay float32).
  c.conv_impl = 'xla'           # 'xla' (every backend) or 'im2col'
                                # (a CPU lever).
  c.space_to_depth = 1          # conv: the block (1, 2, 4, 8) full-size maps
                                # are packed with, halved per stage
                                # (layout.py: TPU lanes); 1: plain NHWC.
  c.remat = False               # recompute block activations in the backward.
  c.precision = 'highest'       # float32 matmuls/convs: 'highest' (exact on
                                # every backend), 'high' or 'default' (TPU:
                                # 3 or 1 bfloat16 passes; GPU: TF32 allowed).
  c.data_dim = 2                # mlp only
  c.mlp_hidden = (256, 256, 256)

  # Objective: 'introvae' (reference `main.py` flags below), 'soft_introvae'
  # (its own namespace) or 'vae' (the warm-up, vae_weight_*, at every step).
  c.objective = 'introvae'
  c.mode = 'reference'          # 'reference' (exact) or 'fused' (one pass).
  c.m_plus = 120.0
  c.weight_rec = 0.05
  c.weight_kl = 1.0
  c.weight_neg = 0.5
  c.num_vae_steps = 0           # plain-VAE warm-up steps (reference: num_vae
                                # epochs).
  c.vae_weight_rec = 1.0        # warm-up loss vae_weight_rec*L_AE +
  c.vae_weight_kl = 1.0         # vae_weight_kl*KL (reference: 1 and 1;
                                # compare's betavae: the recipe's).
  # Soft-IntroVAE (taldatech/soft-intro-vae-pytorch `train_soft_intro_vae.py`
  # defaults; beta_neg 256 as their MNIST and CIFAR-10 recommendation). Its
  # warm-up (num_vae_steps) is beta_rec*L_AE + beta_kl*KL, unscaled.
  c.soft_introvae = ml_collections.ConfigDict(dict(
      beta_rec=1.0, beta_kl=1.0, beta_neg=256.0, gamma_r=1e-8))

  # Optimisers: two Adams, no clipping, no weight decay.
  c.lr_e = 2e-4
  c.lr_g = 2e-4
  # Both learning rates x lr_decay at each boundary (torch MultiStepLR stepped
  # per iteration: step i uses lr * lr_decay ** #{b <= i}); () for none.
  c.lr_boundaries = ()
  c.lr_decay = 0.1
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
  c.dataset = 'mnist_offline'   # TFDS name, 'folder', or a built-in
                                # offline set.
  c.data_dir = ''               # TFDS data_dir, or the image folder for
                                # 'folder'.
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
  c.max_consecutive_skips = 10  # 'skip': stop after this many skips in a row.
  # The most steps dispatched to the devices and not yet complete: 2 runs step
  # t while the host waits for step t-1, and bounds how long a stop signal
  # waits (docs/long_runs.md); 1 runs each step synchronously.
  c.max_steps_in_flight = 2

  # Evaluation during training (introvae_jax.evaluation), written to
  # TensorBoard.
  c.eval_every_steps = 0        # 0: off.
  c.eval_num_images = 1000
  c.fid_weights = ''            # pt_inception-2015-12-05-6726825d.pth
                                # (FID/KID).
  c.digit_classifier = ''       # digit CNN weights (mnist_offline); '' = cache.

  # Resuming: identity fields (all but FREE_ON_RESUME) that may differ from the
  # run's stored config.json, comma-separated, e.g. 'dataset,batch_size'.
  c.allow_changes = ''
  return c.lock()


# The most images (each set) an evaluation takes: FID's usual count. SWD and
# KID compare whole sets, so all of them are held in memory.
MAX_EVAL_IMAGES = 50_000

# What each field accepts: every field of base_config() has an entry
# (tests/test_configuration.py checks), so none reaches the code unchecked.
_COUNT = Int(low=1)            # sizes, widths, intervals, step counts
_WEIGHT = Float(low=0.0)       # loss weights and the margin
_LR = Float(low=0.0, high=1.0, low_open=True,
            note='a learning rate; the reference uses 2e-4')
_BETA = Float(low=0.0, high=1.0, high_open=True)
_PATH = Str()                  # '' means "the default" for every path field
_DETECT = ((-1, 'detect it'),)

CONSTRAINTS = {
    # JAX's default PRNG keys hold 32 bits, and the loop also uses seed + 1
    # and seed + 2; NumPy's SeedSequence (data order) refuses negatives.
    'seed': Int(low=0, high=2**31 - 1),
    'arch': Choice(ARCHS),
    'image_size': _COUNT,  # conv: base_size * 2**len(channels), see below
    'base_size': _COUNT,
    'channels': PositiveInts(),
    'image_channels': Choice((1, 3)),
    'hdim': _COUNT,
    'reference_layout': Bool(),
    'residual_block': Choice(tuple(models.RESIDUAL_BLOCKS)),
    # Part of the identity, though a resume restores the parameters: the
    # run's config.json keeps saying how its parameters started.
    'init': Choice(models.INITS),
    'dtype': Choice(DTYPES),
    'conv_impl': Choice(('xla', 'im2col')),
    'space_to_depth': Choice((1, 2, 4, 8)),
    'remat': Bool(),
    'precision': Choice(PRECISIONS),
    'data_dim': _COUNT,
    'mlp_hidden': PositiveInts(),
    'objective': Choice(OBJECTIVES),
    'mode': Choice(MODES),
    'm_plus': _WEIGHT,
    'weight_rec': _WEIGHT,
    'weight_kl': _WEIGHT,
    'weight_neg': _WEIGHT,
    'num_vae_steps': Int(low=0),
    'vae_weight_rec': _WEIGHT,
    'vae_weight_kl': _WEIGHT,
    'soft_introvae.beta_rec': _WEIGHT,
    'soft_introvae.beta_kl': _WEIGHT,
    'soft_introvae.beta_neg': _WEIGHT,
    'soft_introvae.gamma_r': _WEIGHT,
    'lr_e': _LR,
    'lr_g': _LR,
    'lr_boundaries': PositiveInts(increasing=True),
    'lr_decay': Float(low=0.0, high=1.0, low_open=True),
    'adam_b1': _BETA,
    'adam_b2': _BETA,
    'adam_eps': Float(low=0.0, low_open=True),
    'batch_size': _COUNT,
    'sync_batch_stats': Bool(),
    'distributed': Bool(),
    'coordinator_address': Str(),
    'num_processes': Int(low=1, special=_DETECT),
    'process_id': Int(low=0, special=_DETECT),  # < num_processes: below
    'dataset': Str(nonempty=True),
    'data_dir': _PATH,
    'split': Str(nonempty=True),
    'manual_dir': _PATH,
    'random_flip': Bool(),
    'shuffle_buffer': _COUNT,
    'on_corrupt_image': Choice(('skip', 'error')),
    'eval_split_fraction': _BETA,
    'num_train_steps': _COUNT,
    'log_every_steps': _COUNT,
    'image_every_steps': _COUNT,
    'checkpoint_every_steps': _COUNT,
    # Orbax's "keep all" (None) cannot be given as a flag; a large number
    # keeps that many. 0 used to delete every checkpoint, old and new.
    'max_to_keep': Int(low=1, note='the newest checkpoints to keep'),
    'num_image_samples': _COUNT,
    'on_nonfinite': Choice(('stop', 'skip')),
    'max_consecutive_skips': _COUNT,
    'max_steps_in_flight': _COUNT,
    'eval_every_steps': Int(low=1, special=((0, 'turn evaluation off'),)),
    'eval_num_images': Int(low=1, high=MAX_EVAL_IMAGES),
    'fid_weights': _PATH,
    'digit_classifier': _PATH,
    'allow_changes': FieldNames(),
}


def _shown(value) -> str:
  """repr of a value, cut short: messages stay one line."""
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + '...'


def field_problem(name: str, value) -> Optional[str]:
  """'<name>=<value> <what is wrong and allowed>', or None if allowed."""
  problem = CONSTRAINTS[name].problem(value)
  return None if problem is None else f'{name}={_shown(value)} {problem}.'


# Fields a resumed run may change without `allow_changes`: how long to train,
# what to log and how, and how to compute the same numbers. Every other field
# is part of the run's identity (data, model, objective, optimiser, batch,
# mode, dtype, seed) and is checked against the stored config.json.
FREE_ON_RESUME = frozenset({
    'num_train_steps', 'log_every_steps', 'image_every_steps',
    'checkpoint_every_steps', 'max_to_keep', 'num_image_samples',
    'on_nonfinite', 'max_consecutive_skips', 'max_steps_in_flight',
    'on_corrupt_image',
    'eval_every_steps', 'eval_num_images',
    'fid_weights', 'digit_classifier', 'conv_impl', 'space_to_depth',
    'remat', 'precision',
    'distributed', 'coordinator_address', 'num_processes', 'process_id',
    'allow_changes',
})


def _names(text: str) -> frozenset:
  return frozenset(n.strip() for n in text.split(',') if n.strip())


def allowed_changes(config) -> frozenset:
  return _names(config.allow_changes)


def flat_fields(config) -> dict:
  """{name: value} of a config (or its stored record), a namespace's fields
  named 'namespace.field' (e.g. 'soft_introvae.beta_neg')."""
  out = {}
  for name, value in config.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update({f'{name}.{k}': v for k, v in flat_fields(value).items()})
    else:
      out[name] = value
  return out


def field(config, name: str):
  """A field by its flat name ('hdim', 'soft_introvae.beta_neg')."""
  for part in name.split('.'):
    config = config[part]
  return config


def identity_changes(stored, config):
  """[(field, stored value, new value)] of identity fields that differ."""
  stored, config = flat_fields(stored), flat_fields(config)
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
  except IsADirectoryError:
    raise ConfigError(f'{path} is a folder, not a config file; move it away '
                      '(the checkpoints record the config too).') from None
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f'{path} is not valid JSON ({e}); restore it from '
                      'config.<step>.json beside it or rewrite it.') from e
  if not isinstance(saved, dict):
    raise ConfigError(f'{path} does not hold a config (a JSON object).')
  return saved


def load_json(path: str) -> ml_collections.ConfigDict:
  """A run's saved `config.json` (written by the training loop), locked; each
  stored field is checked against CONSTRAINTS (a hand edit can break one)."""
  return from_record(read_json(path), path)


def from_record(saved: dict, where: str) -> ml_collections.ConfigDict:
  """A locked config from a stored record (config.json's or a checkpoint's
  metadata); `where` names the record in errors."""
  config = base_config()
  saved = flat_fields(saved)
  unknown = sorted(set(saved) - set(flat_fields(config)))
  if unknown:
    raise ConfigError(f'{where} has fields this version does not know: '
                      f'{unknown}; use the introvae-jax version that wrote it.')
  values = {name: tuple(value) if isinstance(value, list) else value
            for name, value in saved.items()}
  for name, value in values.items():
    problem = field_problem(name, value)
    if problem:
      raise ConfigError(f'{where} holds an invalid field: {problem} Fix it, or '
                        'restore config.<step>.json beside it.')
  with config.unlocked():
    for name, value in values.items():
      *namespace, last = name.split('.')
      target = field(config, '.'.join(namespace)) if namespace else config
      target[last] = value
  return config


def validate(config) -> None:
  """Raises ConfigError naming the field, its value and what is allowed: each
  field against CONSTRAINTS, then the fields that depend on each other."""
  def fail(msg):
    raise ConfigError(f'Invalid config: {msg}')

  for name in CONSTRAINTS:
    problem = field_problem(name, field(config, name))
    if problem:
      fail(problem)
  if config.dtype == 'float64' and not jax.config.jax_enable_x64:
    fail("dtype='float64' needs 64-bit JAX, which is off: set "
         'JAX_ENABLE_X64=1 in the environment (main.py does it for you), or '
         "call jax.config.update('jax_enable_x64', True) before any array is "
         'made.')
  if config.arch == 'conv':
    size, chans = config.image_size, tuple(config.channels)
    base = config.base_size
    if base == 4 and (size < 8 or size & (size - 1)):
      fail(f'image_size={size} is not 4 * 2**n (8, 16, 32, ... 1024); '
           'another size needs config.base_size (image_size = base_size * '
           '2**len(channels)).')
    if base * 2 ** len(chans) != size:
      fail(f'image_size={size} does not match channels={_shown(chans)} and '
           f'base_size={base}: the model downsamples len(channels)='
           f'{len(chans)} times to {base}x{base}, so it needs image_size='
           f'{base * 2 ** len(chans)} (or set channels to '
           f'introvae_jax.channels_for({size}), or base_size to '
           f'image_size / 2**len(channels)).')
    if config.space_to_depth > 2 ** len(chans):
      fail(f'space_to_depth={config.space_to_depth} packs more than the '
           f'{2 ** len(chans)}x{2 ** len(chans)} pixels that the model '
           f'pools to one: use at most {2 ** len(chans)}.')
  if config.mode == 'fused':
    if not objectives.get(config.objective).FUSED:
      fail(f"mode='fused' is IntroVAE's one-pass variant; objective="
           f"{config.objective!r} has no fused form: use mode='reference'.")
  _validate_distributed(config, fail)


def _validate_distributed(config, fail) -> None:
  num, pid = config.num_processes, config.process_id
  given = [name for name, unset in (('coordinator_address', ''),
                                    ('num_processes', -1), ('process_id', -1))
           if config[name] != unset]
  if given and not config.distributed:
    fail(f'{", ".join(given)} set but distributed=False; set '
         '--config.distributed=True for a multi-process run.')
  if 0 < num <= pid:
    fail(f'process_id={pid} must be in [0, num_processes={num}), or -1 to '
         'detect it.')


def enable_x64_for(dtypes, what: str) -> bool:
  """Enables 64-bit JAX when `dtypes` (one dtype name or several) name
  float64, as every program does for a float64 run before any array is made:
  without it a float64 checkpoint or config gives float32 arrays without a
  word. Returns whether 64-bit JAX is needed."""
  dtypes = {dtypes} if isinstance(dtypes, str) else set(dtypes)
  if 'float64' not in dtypes:
    return False
  if not jax.config.jax_enable_x64:
    try:
      jax.config.update('jax_enable_x64', True)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(
          f'{what} is float64 but 64-bit JAX cannot be enabled here '
          f'({type(e).__name__}: {e}); rerun with JAX_ENABLE_X64=1.') from e
    logging.info('%s is float64: 64-bit JAX enabled.', what)
  return True


def check_batch_divides(global_batch: int, num_devices: int) -> int:
  """Per-device batch size, or a clear error when it does not divide."""
  if global_batch % num_devices:
    lo = global_batch - global_batch % num_devices
    raise ConfigError(
        f'batch_size={global_batch} does not divide over {num_devices} '
        'devices; '
        f'use a multiple of {num_devices} (e.g. --config.batch_size='
        f'{lo or num_devices} or {lo + num_devices}).')
  return global_batch // num_devices
