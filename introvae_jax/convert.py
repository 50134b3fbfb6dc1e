"""Convert between the authors' PyTorch checkpoints and this project's
variables.

Import: a reference checkpoint (hhb072/IntroVAE `save_checkpoint` writes
`{'epoch': e, 'model': <the whole pickled IntroVAE module>}`; a plain
`state_dict`, or `{'model': state_dict}`, works too) becomes an Orbax
checkpoint of a full `TrainState` (step 0, fresh Adam states) at
`<out>/checkpoints/0`, the workdir layout that `main.py --workdir=<out>`
resumes from and the sampling tools load::

  python -m introvae_jax.convert --torch_checkpoint=model_epoch_10_iter_0.pth \
      --out=runs/converted [--config=configs/celebahq256.py]

It writes `<out>/config.json` beside the checkpoint, as the training loop
does, so `introvae_jax.generate`, `introvae_jax.evaluation` and `main.py`
open the converted workdir like a trained one.

Without `--config`, the model fields (channels, hdim, image size, image
channels, the decoder's base map, the skip-convolution layout) are read off
the checkpoint and the other fields are `base_config()`'s; with it, they
must agree with the checkpoint. Export: a workdir's weights become a PyTorch
`state_dict` with the reference's key names, for the reference's
`model.load_state_dict`::

  python -m introvae_jax.convert --jax_checkpoint=runs/converted \
      --out=introvae.pth [--step=N]

Soft-IntroVAE's files (taldatech/soft-intro-vae-pytorch `save_checkpoint`:
`{"epoch", "model": state_dict}`) use the same keys with another residual
block (`bn2` before the skip add), which no key or shape tells apart. The
import takes the block from the recipe (`--config` with
`residual_block='soft_introvae'`, e.g. configs/soft_cifar10.py, or
`--residual_block=soft_introvae`) and refuses a file whose BatchNorm
statistics fit the other block (`check_block_variant`). A Soft-IntroVAE
workdir exports as `{"epoch": 0, "model": state_dict}`, what their
`load_model` reads. Their 28 px MNIST networks have a 7x7 decoder base
(`base_size`, read off the file).

Layout changes (reference NCHW / PyTorch -> this project NHWC / Flax):
convolution kernels OIHW -> HWIO; dense weights [out, in] -> kernels
[in, out]; the encoder's dense layer reads the last feature map flattened in
(C, H, W) order and the decoder's dense layer writes one that is viewed as
(C, 4, 4), while this project flattens and reshapes in (H, W, C) order, so
those two dense layers' rows/columns are permuted; BatchNorm
weight/bias/running_mean/running_var -> params scale/bias and batch_stats
mean/var (`num_batches_tracked` only matters with momentum=None, which the
reference does not use: dropped on import, written as 0 on export).

Reading runs nothing from the file and needs neither torch nor a copy of
the reference's source (`files.read_pth`): it parses torch's formats itself,
tensors become numpy arrays and every pickled class (`networks.IntroVAE`,
`torch.nn.Conv2d`, ...) an inert stand-in that only keeps its attributes;
TorchScript archives, whose code would run on loading, are refused. Export
writes with torch (`torch.save`).

A float64 run (`dtype='float64'`) is exported in float64, and a float64
`--config` imports in float64: the tool enables 64-bit JAX for them before
any array is made, as main.py does.
"""
import collections
import io
import math
import re
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from absl import flags
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from introvae_jax import checkpointing
from introvae_jax import configuration
from introvae_jax import errors
from introvae_jax import extras
from introvae_jax import files
from introvae_jax import models
from introvae_jax import step as step_lib
from introvae_jax import workdir as workdir_lib
from introvae_jax.errors import BadFileError, MissingFileError

Arrays = Dict[str, np.ndarray]

# ----------------------------------------------------------------------------
# Reading reference checkpoints.


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise extras.missing(e, 'Writing PyTorch checkpoints') from e
  return torch


def _module_state(path: str, obj) -> Iterator[Tuple[str, Any]]:
  """(key, tensor) pairs of a pickled module, in `state_dict()` naming.

  Walks `_modules` depth first without recursion, so neither a deep nor a
  cyclic file (a module that contains itself) can raise RecursionError.
  """
  stack = [('', obj, ())]
  while stack:
    prefix, module, ancestors = stack.pop()
    if id(module) in ancestors:
      raise BadFileError(
          f'{path}: module {prefix[:-1]!r} contains itself, so it has no '
          'state_dict; pass a checkpoint the reference\'s torch.save wrote.')
    parts = [getattr(module, name, None) for name in (
        '_parameters', '_buffers', '_modules')]
    non_persistent = getattr(module, '_non_persistent_buffers_set', set())
    if not all(p is None or isinstance(p, dict) for p in parts) or not (
        isinstance(non_persistent, (set, frozenset))):
      raise BadFileError(
          f'{path}: {prefix[:-1] or "the model"} is no torch module (a '
          f'{type(module).__name__}); pass the reference\'s checkpoint.')
    params, buffers, children = (p or {} for p in parts)
    for name, value in list(params.items()) + list(buffers.items()):
      if value is not None and name not in non_persistent:
        yield prefix + str(name), value
    # Reversed onto the stack so children come out in their pickled order.
    for name, child in reversed(list(children.items())):
      if child is not None:
        stack.append((f'{prefix}{name}.', child, ancestors + (id(module),)))


def load_reference_checkpoint(path: str) -> Arrays:
  """A reference checkpoint file -> its state_dict as {key: np.ndarray}.

  Accepts `{'epoch', 'model': module}` (the reference's own files),
  `{'model': state_dict}` and plain state_dicts; strips a leading 'module.'
  (DataParallel wrappers). Read by `files.read_pth`, which runs nothing from
  the file and needs no torch. A missing file, or one that is no
  checkpoint, raises a `UserError` naming it.
  """
  if not epath.Path(path).exists():
    raise MissingFileError(f'No file at --torch_checkpoint={path}; pass the '
                           "reference's .pth (model_epoch_*_iter_*.pth).")
  obj = files.read_pth(
      path, 'a readable PyTorch checkpoint', "pass a .pth written by the "
      "reference's torch.save, and copy it again if it may be truncated.")
  if isinstance(obj, Mapping) and 'model' in obj:
    obj = obj['model']
  if isinstance(obj, Mapping):
    items = obj.items()
  elif hasattr(obj, '_modules'):
    items = _module_state(path, obj)
  else:
    got = getattr(obj, 'pickled_class', type(obj).__name__)
    raise BadFileError(f'{path}: expected a reference checkpoint '
                       "({'epoch', 'model'}) or a state_dict, got "
                       f'{got}.')
  out = {}
  for key, value in items:
    if not isinstance(value, np.ndarray):
      got = getattr(value, 'pickled_class', type(value).__name__)
      raise BadFileError(f'{path}: entry {key!r} is a {got}, not a tensor; '
                         'is this an IntroVAE checkpoint?')
    key = str(key)
    key = key[len('module.'):] if key.startswith('module.') else key
    out[key] = value
  return out


# ----------------------------------------------------------------------------
# The correspondence between the two layouts.


def _block_names(net: str, n: int, image_size: int):
  """(flax block name, reference module prefix) of each residual block.

  Encoder `block_i` (i = 1..n) is the reference's `res_in_{size}`, named after
  its input resolution size = image_size / 2**i; decoder `block_k`
  (k = 0..n) is `res_in_{4 * 2**k}`.
  """
  if net == 'e':
    return [(f'block_{i}', f'encoder.main.res_in_{image_size >> i}')
            for i in range(1, n + 1)]
  return [(f'block_{k}', f'decoder.main.res_in_{4 << k}') for k in range(n + 1)]


def _layers(n: int, image_size: int, has_expand):
  """(network, flax path, reference prefix, kind) for every layer.

  In the order of the reference's `state_dict()`.
  """
  def blocks(net):
    for block, ref in _block_names(net, n, image_size):
      if has_expand(net, block, ref):
        yield net, (block, 'conv_expand'), f'{ref}.conv_expand', 'conv'
      for j in (1, 2):
        yield net, (block, f'conv{j}'), f'{ref}.conv{j}', 'conv'
        yield net, (block, f'bn{j}'), f'{ref}.bn{j}', 'bn'

  yield 'e', ('conv_in',), 'encoder.main.0', 'conv'
  yield 'e', ('bn_in',), 'encoder.main.1', 'bn'
  yield from blocks('e')
  yield 'e', ('fc',), 'encoder.fc', 'encoder_fc'
  yield 'g', ('fc',), 'decoder.fc.0', 'decoder_fc'
  yield from blocks('g')
  yield 'g', ('conv_out',), 'decoder.main.predict', 'conv'


def _encoder_fc_to_flax(w, b, base):
  """[2h, C*b*b] reading (C, b, b) -> kernel [b*b*C, 2h] reading (b, b, C)."""
  out = w.shape[0]
  return (w.reshape(out, -1, base, base).transpose(2, 3, 1, 0)
          .reshape(-1, out), b)


def _encoder_fc_to_torch(kernel, b, base):
  out = kernel.shape[1]
  return (kernel.reshape(base, base, -1, out).transpose(3, 2, 0, 1)
          .reshape(out, -1), b)


def _decoder_fc_to_flax(w, b, base):
  """[C*b*b, h] writing (C, b, b) -> kernel [h, b*b*C] writing (b, b, C)."""
  h = w.shape[1]
  kernel = w.reshape(-1, base, base, h).transpose(3, 1, 2, 0).reshape(h, -1)
  return kernel, b.reshape(-1, base, base).transpose(1, 2, 0).reshape(-1)


def _decoder_fc_to_torch(kernel, b, base):
  h = kernel.shape[0]
  w = kernel.reshape(h, base, base, -1).transpose(3, 1, 2, 0).reshape(-1, h)
  return w, b.reshape(base, base, -1).transpose(2, 0, 1).reshape(-1)


_FC = {'encoder_fc': (_encoder_fc_to_flax, _encoder_fc_to_torch),
       'decoder_fc': (_decoder_fc_to_flax, _decoder_fc_to_torch)}


def _num_blocks(keys) -> Tuple[int, int]:
  """(len(channels), image_size) from the encoder's `res_in_*` blocks: the
  first is named after image_size / 2 (28 px: res_in_14, res_in_7)."""
  sizes = {int(m.group(1)) for k in keys
           if (m := re.match(r'encoder\.main\.res_in_(\d+)\.', k))}
  if not sizes:
    raise BadFileError('No encoder.main.res_in_* entries: not an IntroVAE '
                     'checkpoint (or not from the reference code).')
  n, image_size = len(sizes), 2 * max(sizes)
  if sorted(sizes) != [image_size >> i for i in range(n, 0, -1)]:
    raise BadFileError(f'Encoder blocks res_in_{sorted(sizes)} do not halve '
                       'from block to block: not an IntroVAE checkpoint.')
  return n, image_size


def _entry(state_dict: Mapping[str, np.ndarray], key: str,
           ndim: int) -> np.ndarray:
  """`state_dict[key]` with `ndim` dimensions, or a BadFileError naming it."""
  value = state_dict.get(key)
  if value is None:
    raise BadFileError(
        f'Reference checkpoint lacks {key!r} (it has {len(state_dict)} '
        f'entries, e.g. {sorted(state_dict)[:3]}): not a whole IntroVAE '
        'model; pass the .pth the reference saved.')
  if np.ndim(value) != ndim:
    raise BadFileError(
        f'Reference checkpoint entry {key!r} has shape {np.shape(value)}, '
        f'not {ndim} dimensions: not an IntroVAE checkpoint.')
  return np.asarray(value)


def infer_model_fields(state_dict: Mapping[str, np.ndarray]) -> dict:
  """The config's model fields a reference state_dict was built with.

  `reference_layout` is None when no block can tell (no equal widths above
  256 from two list entries). A missing or misshapen entry raises
  BadFileError naming it.
  """
  n, image_size = _num_blocks(state_dict)
  conv_in = _entry(state_dict, 'encoder.main.0.weight', 4)
  channels = [conv_in.shape[0]] + [
      _entry(state_dict, f'encoder.main.res_in_{image_size >> i}.conv1.weight',
             4).shape[0]
      for i in range(1, n)]
  # Blocks whose skip convolution exists only by the reference's `is not` quirk.
  quirk = [f'encoder.main.res_in_{image_size >> i}' for i in range(1, n)
           if channels[i - 1] == channels[i] > 256]
  quirk += [f'decoder.main.res_in_{4 << k}' for k in range(1, n)
            if channels[n - k] == channels[n - k - 1] > 256]
  has = [f'{q}.conv_expand.weight' in state_dict for q in quirk]
  layout = None if not has else all(has)
  if has and any(has) != all(has):
    raise BadFileError(f'Inconsistent skip convolutions in {quirk}: {has}.')
  return dict(arch='conv', image_size=image_size, channels=tuple(channels),
              base_size=image_size >> n,
              hdim=_entry(state_dict, 'encoder.fc.weight', 2).shape[0] // 2,
              image_channels=conv_in.shape[1], reference_layout=layout)


def _set(tree: dict, path, value):
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path):
  for name in path:
    tree = tree[name]
  return tree


def torch_to_variables(state_dict: Mapping[str, np.ndarray]) -> Dict[str, dict]:
  """Reference state_dict -> {'params_e', 'batch_stats_e', 'params_g',
  'batch_stats_g'}.

  Raises ValueError naming missing or unexpected keys.
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  n, image_size = _num_blocks(sd)
  out = {k: {} for k in ('params_e', 'batch_stats_e', 'params_g',
                         'batch_stats_g')}
  used = set()

  def take(key, ndim=1):
    if key not in sd:
      raise BadFileError(f'Reference checkpoint lacks {key!r} (expected a '
                       f'{image_size}px model with {n} channel entries).')
    used.add(key)
    return _entry(sd, key, ndim)

  has_expand = lambda net, block, ref: f'{ref}.conv_expand.weight' in sd
  for net, path, ref, kind in _layers(n, image_size, has_expand):
    params, stats = out[f'params_{net}'], out[f'batch_stats_{net}']
    if kind == 'conv':
      _set(params, path + ('kernel',),
           take(f'{ref}.weight', 4).transpose(2, 3, 1, 0))
      if f'{ref}.bias' in sd:
        _set(params, path + ('bias',), take(f'{ref}.bias'))
    elif kind == 'bn':
      _set(params, path + ('scale',), take(f'{ref}.weight'))
      _set(params, path + ('bias',), take(f'{ref}.bias'))
      _set(stats, path + ('mean',), take(f'{ref}.running_mean'))
      _set(stats, path + ('var',), take(f'{ref}.running_var'))
      used.add(f'{ref}.num_batches_tracked')
    else:
      kernel, bias = _FC[kind][0](take(f'{ref}.weight', 2),
                                  take(f'{ref}.bias'), image_size >> n)
      _set(params, path + ('kernel',), kernel)
      _set(params, path + ('bias',), bias)
  unexpected = sorted(set(sd) - used)
  if unexpected:
    raise BadFileError(f'Unexpected entries in the reference checkpoint: '
                     f'{unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}')
  return out


def variables_to_torch_arrays(params_e, batch_stats_e, params_g,
                              batch_stats_g) -> 'collections.OrderedDict':
  """This project's variables -> reference state_dict entries as numpy arrays.

  Key names and order are those of the reference's `IntroVAE.state_dict()`.
  """
  trees = {'params_e': params_e, 'batch_stats_e': batch_stats_e,
           'params_g': params_g, 'batch_stats_g': batch_stats_g}
  n = len([k for k in params_e if k.startswith('block_')])
  # The encoder's dense layer reads base x base x (its last block's width).
  width = np.shape(params_e[f'block_{n}']['conv2']['kernel'])[-1]
  base = math.isqrt(np.shape(params_e['fc']['kernel'])[0] // width)
  image_size = base << n
  has_expand = lambda net, block, ref: (
      'conv_expand' in trees[f'params_{net}'][block])
  sd = collections.OrderedDict()
  get = lambda tree, path: np.asarray(_get(tree, path))
  for net, path, ref, kind in _layers(n, image_size, has_expand):
    params, stats = trees[f'params_{net}'], trees[f'batch_stats_{net}']
    if kind == 'conv':
      sd[f'{ref}.weight'] = get(params, path + ('kernel',)).transpose(
          3, 2, 0, 1)
      if 'bias' in _get(params, path):
        sd[f'{ref}.bias'] = get(params, path + ('bias',))
    elif kind == 'bn':
      sd[f'{ref}.weight'] = get(params, path + ('scale',))
      sd[f'{ref}.bias'] = get(params, path + ('bias',))
      sd[f'{ref}.running_mean'] = get(stats, path + ('mean',))
      sd[f'{ref}.running_var'] = get(stats, path + ('var',))
      sd[f'{ref}.num_batches_tracked'] = np.zeros((), np.int64)
    else:
      w, b = _FC[kind][1](get(params, path + ('kernel',)),
                          get(params, path + ('bias',)), base)
      sd[f'{ref}.weight'], sd[f'{ref}.bias'] = w, b
  return sd


def export_state_dict(state) -> 'collections.OrderedDict':
  """A `TrainState` (or a mapping with its four variable fields) -> torch
  state_dict."""
  torch = _torch()
  get = (state.__getitem__ if isinstance(state, Mapping)
         else lambda k: getattr(state, k))
  arrays = variables_to_torch_arrays(*(get(k) for k in (
      'params_e', 'batch_stats_e', 'params_g', 'batch_stats_g')))
  return collections.OrderedDict(
      (k, torch.from_numpy(np.array(v))) for k, v in arrays.items())


# ----------------------------------------------------------------------------
# TrainState and Orbax.


def check_model_fields(config, state_dict: Mapping[str, np.ndarray]) -> None:
  """Raises ValueError naming each config field that disagrees with the
  checkpoint."""
  found = infer_model_fields(state_dict)
  wrong = [f'{k}={config[k]!r} (checkpoint: {v!r})' for k, v in found.items()
           if v is not None and (tuple(config[k]) if k == 'channels'
                                 else config[k]) != v]
  if wrong:
    raise errors.ConfigError('Config does not match the reference checkpoint: '
                     + ', '.join(wrong) + '. Fix these config fields, or leave '
                     'out --config to take them from the checkpoint.')


def config_for_checkpoint(state_dict: Mapping[str, np.ndarray], config=None,
                          residual_block: Optional[str] = None):
  """`config` checked against the checkpoint, or base_config() with its model
  fields and `residual_block` (the one model field the keys cannot tell:
  default 'introvae')."""
  if config is None:
    config = configuration.base_config()
    with config.unlocked():
      for k, v in infer_model_fields(state_dict).items():
        if v is not None:
          config[k] = v
      if residual_block is not None:
        config.residual_block = residual_block
  elif residual_block not in (None, config.residual_block):
    raise errors.UserError(
        f'--residual_block={residual_block} and the recipe\'s '
        f'residual_block={config.residual_block!r} disagree; give one of them.')
  check_model_fields(config, state_dict)
  configuration.validate(config)
  return config


# The factor by which the other residual block must fit a file's statistics
# better before an import under the recipe's block is refused.
_MISFIT_RATIO = 10.0


def block_misfit(variables: Mapping[str, dict], config,
                 num: int = 64, num_blocks: int = 2) -> Dict[str, float]:
  """{residual_block: misfit} of the decoder's stored BatchNorm statistics.

  IntroVAE's and Soft-IntroVAE's files have the same keys and shapes; only
  what `bn2` normalised differs (the branch plus the skip, or the branch
  alone). The decoder learns to decode N(0, I) codes (the prior samples of
  every iteration), so decoding `num` of them through its first
  `num_blocks` blocks in training mode reproduces the `bn2` batch
  statistics it was trained on under the right variant. The misfit is the
  mean over their `bn2` channels of ((batch mean - running mean)^2 /
  running var + log(batch var / running var)^2). Measured on 28 px models
  trained 150 steps (tests/test_convert.py): 0.003-0.008 for the right
  block, 0.71-0.73 for the wrong one, for both objectives; a fresh model's
  unchanged statistics give 0.30 and 1.17, hence the factor 10.
  """
  params, stats = variables['params_g'], variables['batch_stats_g']
  dtype = jnp.float32
  z = jax.random.normal(jax.random.PRNGKey(0), (num, config.hdim), dtype)
  base, m = config.base_size, models.BN_MOMENTUM
  cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), t)
  fc = cast(params['fc'])
  h0 = jax.nn.relu(z @ fc['kernel'] + fc['bias']).reshape(num, base, base, -1)
  out = {}
  for block_name, before_add in models.RESIDUAL_BLOCKS.items():
    h, terms = h0, []
    for k in range(min(num_blocks, len(config.channels) + 1)):
      p, s = params[f'block_{k}'], stats[f'block_{k}']
      block = models.ResidualBlock(
          np.shape(p['conv1']['kernel'])[-1], 'conv_expand' in p,
          bn_before_add=before_add)
      h, new = block.apply({'params': cast(p), 'batch_stats': cast(s)}, h,
                           True, mutable=['batch_stats'])
      old_mean, old_var = cast(s['bn2']['mean']), cast(s['bn2']['var'])
      # Running = (1 - m) * running + m * batch, so the batch's is recoverable.
      mean = (new['batch_stats']['bn2']['mean'] - (1 - m) * old_mean) / m
      var = (new['batch_stats']['bn2']['var'] - (1 - m) * old_var) / m
      old_var = jnp.maximum(old_var, 1e-8)
      terms.append(jnp.square(mean - old_mean) / old_var
                   + jnp.square(jnp.log(jnp.maximum(var, 1e-8) / old_var)))
      h = models.upsample(h)
    out[block_name] = float(jnp.mean(jnp.concatenate(terms)))
  return out


def check_block_variant(variables: Mapping[str, dict], config) -> None:
  """BadFileError when the file's statistics fit the other residual block
  `_MISFIT_RATIO` times better than the recipe's `residual_block`."""
  misfit = block_misfit(variables, config)
  want = config.residual_block
  other = next(b for b in models.RESIDUAL_BLOCKS if b != want)
  if misfit[want] > _MISFIT_RATIO * misfit[other]:
    raise BadFileError(
        f'its BatchNorm statistics fit the {other!r} residual block, not the '
        f'recipe\'s residual_block={want!r} (decoder misfit {misfit[want]:.3g} '
        f'vs {misfit[other]:.3g}): the two papers\' files have the same keys, '
        f'so loading it would silently build the wrong network. Import it '
        f'with a recipe for its code (--config.residual_block={other} or, '
        f'without --config, --residual_block={other}).')


def train_state_from_reference(state_dict: Mapping[str, np.ndarray], config):
  """A full `TrainState`: converted weights, step 0, fresh Adam states."""
  check_model_fields(config, state_dict)
  abstract = checkpointing.abstract_state(config)
  variables = torch_to_variables(state_dict)
  for name, tree in variables.items():
    want = checkpointing.describe(getattr(abstract, name))
    got = checkpointing.describe(tree)
    if want != got:
      diff = sorted(k for k in set(want) | set(got)
                    if want.get(k) != got.get(k))
      raise errors.ConfigError(
          f'{name}: the checkpoint does not fit the model the config builds '
          f'(reference_layout={config.reference_layout}); e.g. '
          + '; '.join(f'{k}: config {want.get(k)}, checkpoint {got.get(k)}'
                      for k in diff[:4]))
  check_block_variant(variables, config)
  variables = {name: jax.tree_util.tree_map(
      lambda a, spec: jnp.asarray(a, spec.dtype), tree, getattr(abstract, name))
               for name, tree in variables.items()}
  tx_e, tx_g = step_lib.make_optimizers(config)
  return step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(config.seed),
      opt_state_e=tx_e.init(variables['params_e']),
      opt_state_g=tx_g.init(variables['params_g']),
      skipped_steps=jnp.zeros((), jnp.int32), **variables)


def check_new_workdir(workdir: str) -> None:
  """Raises WorkdirError if `workdir` already holds checkpoints (nothing is
  overwritten)."""
  folder = checkpointing.checkpoint_dir(workdir)
  if folder.exists() and any(folder.iterdir()):
    raise errors.WorkdirError(f'--out={workdir} already holds checkpoints '
                              f'({folder}); choose a new --out.')


def save_train_state(workdir: str, state) -> str:
  """Writes `state` as `<workdir>/checkpoints/<step>` (the training layout)."""
  manager = checkpointing.make_manager(workdir)
  if manager.latest_step() is not None:
    raise errors.WorkdirError(
        f'{checkpointing.checkpoint_dir(workdir)} already holds checkpoints; '
        'choose a new --out.')
  checkpointing.save(manager, state, force=True)
  manager.wait_until_finished()
  manager.close()
  return str(checkpointing.checkpoint_dir(workdir) / str(int(state.step)))


def restore_variables(workdir: str, step: Optional[int] = None) -> dict:
  """A step (default: the latest) of a workdir's checkpoints as nested dicts.

  Needs no config: export reads the model's layout off the arrays.
  """
  if not checkpointing.checkpoint_dir(workdir).exists():
    raise errors.WorkdirError(
        f'--jax_checkpoint={workdir} has no checkpoints/ folder; pass a '
        'workdir of this project (main.py --workdir=... or convert --out=...).')
  manager = checkpointing.make_manager(workdir, max_to_keep=None,
                                       read_only=True)
  steps = manager.all_steps()
  step = manager.latest_step() if step is None else step
  if step is None or step not in steps:
    raise errors.WorkdirError(
        f'No checkpoint{"" if step is None else f" of step {step}"} in '
        f'{checkpointing.checkpoint_dir(workdir)} (steps: '
        f'{sorted(steps) or "none"}).')
  return manager.restore(step, args=ocp.args.StandardRestore())


# ----------------------------------------------------------------------------
# Command line.


def convert_reference(torch_checkpoint: str, workdir: str, config=None,
                      residual_block: Optional[str] = None):
  """Reference .pth -> TrainState at `<workdir>/checkpoints/0`, and
  `<workdir>/config.json` (the config it was built from: the model fields
  read off the checkpoint over `config`, or over base_config()).

  Returns (state, config, path of the checkpoint written).
  """
  check_new_workdir(workdir)
  state_dict = load_reference_checkpoint(torch_checkpoint)
  try:
    config = config_for_checkpoint(state_dict, config, residual_block)
    state = train_state_from_reference(state_dict, config)
  except BadFileError as e:
    raise BadFileError(f'{torch_checkpoint}: {e}') from e
  workdir_lib.prepare(workdir)
  path = save_train_state(workdir, state)
  # Written as the training loop writes it, so every tool opens the workdir.
  workdir_lib.write_text(workdir_lib.path(workdir, checkpointing.CONFIG_NAME),
                         config.to_json_best_effort(indent=2))
  return state, config, path


def export_reference(workdir: str, out: str,
                     step: Optional[int] = None) -> None:
  """A workdir's checkpoint -> .pth: a plain state_dict (IntroVAE's block,
  for `model.load_state_dict`), or Soft-IntroVAE's own `{'epoch': 0,
  'model': state_dict}` (what their `load_model` reads) when the workdir's
  config.json says residual_block='soft_introvae'; epoch 0: a step count has
  no epoch."""
  torch = _torch()
  variables = restore_variables(workdir, step)
  state_dict = export_state_dict(variables)
  config_path = workdir_lib.path(workdir, checkpointing.CONFIG_NAME)
  if (config_path.exists() and configuration.read_json(str(config_path)).get(
      'residual_block') == 'soft_introvae'):
    state_dict = {'epoch': 0, 'model': state_dict}
  buffer = io.BytesIO()
  torch.save(state_dict, buffer)
  epath.Path(out).write_bytes(buffer.getvalue())


def _check_export_target(out: str) -> None:
  parent = epath.Path(out).parent
  try:
    parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise errors.UserError(f'Cannot create the folder of --out={out} '
                           f'({e.strerror or e}); pass a writable path.') from e
  if epath.Path(out).is_dir():
    raise errors.UserError(f'--out={out} is a folder; export writes one .pth '
                           'file: pass its path, e.g. --out=introvae.pth.')


def _stored_dtypes(workdir: str) -> set:
  """The dtype names of a workdir's run, read before any array is made:
  its config.json `dtype` and, without one, the dtypes its latest
  checkpoint's metadata lists."""
  config_path = workdir_lib.path(workdir, checkpointing.CONFIG_NAME)
  if config_path.exists():
    return {str(configuration.read_json(str(config_path)).get('dtype'))}
  if not checkpointing.checkpoint_dir(workdir).exists():
    return set()  # restore_variables names the problem
  manager = checkpointing.make_manager(workdir, max_to_keep=None,
                                       read_only=True)
  step = manager.latest_step()
  if step is None:
    return set()
  try:
    metadata = manager.item_metadata(step)
  except Exception:  # pylint: disable=broad-except
    return set()  # damaged: restore_variables names the problem
  return {str(getattr(leaf, 'dtype', '')) for leaf in
          jax.tree_util.tree_leaves(metadata)}


def main(argv):
  """`python -m introvae_jax.convert`: --torch_checkpoint to a workdir, or
  --jax_checkpoint to a .pth file."""
  del argv
  f = flags.FLAGS
  if bool(f.torch_checkpoint) == bool(f.jax_checkpoint):
    raise errors.UserError('Give exactly one of --torch_checkpoint (import) or '
                           '--jax_checkpoint (export).')
  checkpointing.quiet_orbax_logs()
  if f.torch_checkpoint:
    if f.step is not None:
      raise errors.UserError('--step is for export (--jax_checkpoint); an '
                             'import always writes step 0.')
    if f.config is not None:  # before any array is made, as main.py does
      configuration.enable_x64_for(f.config.dtype,
                                   f'--config dtype={f.config.dtype!r}')
    _, config, path = convert_reference(f.torch_checkpoint, f.out, f.config,
                                        f.residual_block)
    print(f'Wrote {path}: image_size={config.image_size} '
          f'channels={tuple(config.channels)} hdim={config.hdim} '
          f'image_channels={config.image_channels} '
          f'base_size={config.base_size} '
          f'reference_layout={config.reference_layout} '
          f'residual_block={config.residual_block}')
  else:
    if f.config is not None:
      raise errors.UserError('--config is for import (--torch_checkpoint); '
                             'export reads the model off the checkpoint.')
    _check_export_target(f.out)
    # Before any array is made, as main.py does.
    configuration.enable_x64_for(_stored_dtypes(f.jax_checkpoint),
                   f'--jax_checkpoint={f.jax_checkpoint}')
    export_reference(f.jax_checkpoint, f.out, f.step)
    print(f'Wrote {f.out}')


def _define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      'config', None, 'Python file with get_config() (optional for import: '
      'the model fields are read from the checkpoint). Overrides with '
      '--config.<field>=value.', lock_config=True)
  flags.DEFINE_string('torch_checkpoint', None,
                      'Reference .pth to import (whole pickled module or '
                      'state_dict).')
  flags.DEFINE_string('jax_checkpoint', None,
                      'Export: a workdir of this project (its checkpoints/).')
  flags.DEFINE_enum('residual_block', None, list(models.RESIDUAL_BLOCKS),
                    "Import: the block the file's code used ('introvae': "
                    "hhb072/IntroVAE, 'soft_introvae': Soft-IntroVAE's; "
                    'default: the recipe\'s, else introvae). Their keys are '
                    'the same; a file whose statistics fit the other block is '
                    'refused.')
  flags.DEFINE_integer('step', None, 'Step to export (default: latest).',
                       lower_bound=0)
  flags.DEFINE_string('out', None, 'Import: a new workdir (the checkpoint goes '
                      'to <out>/checkpoints/0, where main.py and the sampling '
                      'tools look). Export: the .pth file.', required=True)


if __name__ == '__main__':
  from introvae_jax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main)
