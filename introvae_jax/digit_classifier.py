"""A small CNN on the offline digits, for Frechet distance / KID features.

InceptionV3 features mean little for 28 px digits and need a weights file;
this classifier is trained here, offline (1,500 Adam steps; about 1.5
CPU-minutes):

    python -m introvae_jax.digit_classifier   # --out=<weights file>

It trains on the first 4,000 of the 5,000 `offline_datasets.mnist()` digits
(in that function's fixed order) and reports accuracy on the last 1,000. The
weights go to a cache file (never shipped in the code); `digit_features`
loads them and returns the 128-d penultimate activations, so

    fd = evaluation.frechet_distance_from_features(
        digit_features(real), digit_features(generated))

is a Frechet distance for digits (and `kernel_inception_distance` a KID).
"""

import functools
import json
import os
from typing import Optional, Tuple

from etils import epath
import flax.linen as nn
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from introvae_jax import cache
from introvae_jax import errors
from introvae_jax import offline_datasets


IMAGE_SIZE = 28
NUM_HELD_OUT = 1_000
FEATURE_DIM = 128
NUM_STEPS = 1_500  # of batch 64: the cached classifier's training


def default_path() -> str:
  """<cache>/digit_classifier.msgpack; the cache is $INTROVAE_CACHE or
  ~/.cache/introvae_jax (`cache.cache_dir`)."""
  return os.path.join(cache.cache_dir(), 'digit_classifier.msgpack')


class DigitCNN(nn.Module):
  """conv32-pool-conv64-pool-dense128-dense10; `features` = the dense128
  output."""

  @nn.compact
  def __call__(self, x, return_features: bool = False):
    h = nn.relu(nn.Conv(32, (3, 3), name='conv1')(x))
    h = nn.max_pool(h, (2, 2), (2, 2))
    h = nn.relu(nn.Conv(64, (3, 3), name='conv2')(h))
    h = nn.max_pool(h, (2, 2), (2, 2))
    h = nn.relu(nn.Dense(FEATURE_DIM, name='fc1')(h.reshape(h.shape[0], -1)))
    if return_features:
      return h
    return nn.Dense(10, name='fc2')(h)


def labelled_digits() -> Tuple[np.ndarray, np.ndarray]:
  """(images, labels): `offline_datasets.mnist()` and its labels, read-only."""
  return offline_datasets.mnist_with_labels()


def split() -> Tuple[Tuple[np.ndarray, np.ndarray],
                     Tuple[np.ndarray, np.ndarray]]:
  """((train images, labels), (held-out images, labels)); 4,000 / 1,000."""
  images, labels = labelled_digits()
  cut = len(images) - NUM_HELD_OUT
  return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def to_classifier_input(images) -> jax.Array:
  """[N, H, W, 1] in [0, 1] -> [N, 28, 28, 1] (antialiased bilinear resize)."""
  x = jnp.asarray(images, jnp.float32)
  if x.ndim != 4 or x.shape[-1] != 1:
    raise ValueError(f'Expected gray images [N, H, W, 1], got {x.shape}.')
  if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
    x = jax.image.resize(x, (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 1), 'linear',
                         antialias=True)
  return x


def _shift(key, x, max_shift=2):
  """Random translation by up to max_shift pixels (zero fill)."""
  n = x.shape[0]
  pad = jnp.pad(x, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))
  dy, dx = jax.random.randint(key, (2, n), 0, 2 * max_shift + 1)
  crop = lambda img, y, x_: jax.lax.dynamic_slice(
      img, (y, x_, 0), (IMAGE_SIZE, IMAGE_SIZE, 1))
  return jax.vmap(crop)(pad, dy, dx)


def train(seed: int = 0, num_steps: int = NUM_STEPS, batch_size: int = 64,
          learning_rate: float = 1e-3, log=print):
  """Trains on the 4,000-digit split; returns (params, held-out accuracy)."""
  (x_train, y_train), (x_test, y_test) = split()
  model = DigitCNN()
  key = jax.random.PRNGKey(seed)
  key, init_key = jax.random.split(key)
  params = model.init(init_key,
                      jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)))['params']
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))
  opt_state = tx.init(params)
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)

  @jax.jit
  def step(params, opt_state, key):
    k_idx, k_shift = jax.random.split(key)
    idx = jax.random.choice(k_idx, len(x_train), (batch_size,), replace=False)
    x = _shift(k_shift, x_train[idx])

    def loss_fn(p):
      logits = model.apply({'params': p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y_train[idx]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for i in range(num_steps):
    params, opt_state, loss = step(params, opt_state,
                                   jax.random.fold_in(key, i))
    if log is not None and (i + 1) % 500 == 0:
      log(f'step {i + 1}: loss {float(loss):.4f}')
  accuracy = evaluate_accuracy(params, x_test, y_test)
  return params, accuracy


@jax.jit
def _logits(params, x):
  return DigitCNN().apply({'params': params}, x)


@jax.jit
def _features(params, x):
  return DigitCNN().apply({'params': params}, x, return_features=True)


def evaluate_accuracy(params, images, labels) -> float:
  """The classifier's accuracy on `images` (as `to_classifier_input` takes
  them) against integer `labels`."""
  logits = _batched(_logits, params, to_classifier_input(images))
  return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def _batched(fn, params, x, batch: int = 1_000):
  return np.concatenate([np.asarray(fn(params, x[i:i + batch]))
                         for i in range(0, x.shape[0], batch)])


def save(params, path: str, metadata: dict) -> None:
  """Weights as flax msgpack, metadata (accuracy, split) as <path>.json
  (local or gs://)."""
  path = epath.Path(os.path.expanduser(path))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(serialization.to_bytes(jax.device_get(params)))
  path.with_name(path.name + '.json').write_text(json.dumps(metadata, indent=2))


def _metadata(accuracy: float, seed: int, num_steps: int) -> dict:
  """What `save` writes beside the weights: how they were trained."""
  return dict(held_out_accuracy=accuracy, seed=seed, num_steps=num_steps,
              train_digits='first 4000', held_out_digits='last 1000')


def _train_command(path) -> str:
  return f'python -m introvae_jax.digit_classifier --out={path}'


@functools.lru_cache(maxsize=4)
def load(path: Optional[str] = None):
  """The classifier's params (default: the cache file); a `UserError` naming
  the file and the command that trains it when it is missing or damaged."""
  path = os.path.expanduser(path or default_path())
  if not epath.Path(path).exists():
    raise errors.MissingFileError(
        f'No digit classifier at {path}. Train it once (about a minute on a '
        f'CPU): {_train_command(path)}')
  try:
    stored = serialization.msgpack_restore(epath.Path(path).read_bytes())
    template = jax.eval_shape(DigitCNN().init, jax.random.PRNGKey(0), jnp.zeros(
        (1, IMAGE_SIZE, IMAGE_SIZE, 1)))['params']
    return serialization.from_state_dict(template, stored)
  except Exception as e:  # pylint: disable=broad-except
    # Foreign or truncated bytes fail in msgpack or flax with many types.
    raise errors.BadFileError(
        f'{path} is not digit classifier weights ({type(e).__name__}: '
        f'{str(e).splitlines()[0] if str(e) else ""}); delete it and train '
        f'again: {_train_command(path)}') from e


def cached(log=print):
  """The classifier's params from the cache file, trained (about 1.5
  CPU-minutes, seed 0) and cached on first use so that a first run has its
  digit distances without another command."""
  path = default_path()
  if not epath.Path(path).exists():
    if log is not None:
      log(f'No digit classifier at {path} yet: training it once (about 1.5 '
          'CPU-minutes) for the digit Frechet distance and KID.')
    params, accuracy = train(num_steps=NUM_STEPS, log=None)
    partial = f'{path}.{os.getpid()}.partial'
    save(params, partial, _metadata(accuracy, seed=0, num_steps=NUM_STEPS))
    # Renamed into place whole: a concurrent or killed run never sees half.
    epath.Path(partial + '.json').rename(path + '.json')
    epath.Path(partial).rename(path)
    if log is not None:
      log(f'Digit classifier: held-out accuracy {accuracy:.4f}, cached at '
          f'{path}.')
  return load(path)


def digit_features(images, params=None,
                   path: Optional[str] = None) -> np.ndarray:
  """128-d penultimate features [N, 128] (float32) of gray digits in [0, 1].

  Images of any square size are resized to 28 px first, so 32 px samples of
  the offline default and the real digits go through the same resize when
  both are passed at 32 px.
  """
  params = load(path) if params is None else params
  return _batched(_features, params, to_classifier_input(images))


def check_output(path: str) -> str:
  """The weights file `--out` names, its folder created; a `UserError` now,
  not after training, when it cannot be written."""
  path = epath.Path(os.path.expanduser(path))
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = path.with_name(f'.{path.name}.write_test')
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise errors.UserError(f'Cannot write --out={path} ({e.strerror or e}); '
                           'pass a file path in a folder you can write to.'
                           ) from e
  return str(path)


def main(argv):
  """`python -m introvae_jax.digit_classifier`: trains the classifier and
  saves it to --out (default: the cache)."""
  from absl import flags
  del argv
  f = flags.FLAGS
  out = check_output(f.out or default_path())
  params, accuracy = train(seed=f.seed, num_steps=f.num_steps)
  save(params, out, _metadata(accuracy, seed=f.seed, num_steps=f.num_steps))
  print(f'held-out accuracy {accuracy:.4f} on {NUM_HELD_OUT} digits; '
        f'weights saved to {out}')


if __name__ == '__main__':
  from absl import flags
  from introvae_jax import cli
  flags.DEFINE_string('out', None, 'Weights file (default: <cache>/'
                      'digit_classifier.msgpack, the cache being '
                      '$INTROVAE_CACHE or ~/.cache/introvae_jax).')
  flags.DEFINE_integer('seed', 0, 'Random seed.')
  flags.DEFINE_integer('num_steps', NUM_STEPS, 'Adam steps of batch 64 (>= 1).',
                       lower_bound=1)
  cli.run(main)
