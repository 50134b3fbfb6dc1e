"""The config schema's constraints: every field is checked, in-process.

`configuration.CONSTRAINTS` says what each field of `base_config()` accepts;
these tests walk every field through bad values of each kind that applies
and check that `validate` and `load_json` refuse them with one short line
naming the field and the value.
"""

import glob
import importlib.util
import json
import math
import os

import pytest

from conftest import REPO_ROOT
from introvae_jax import configuration
from introvae_jax.errors import ConfigError

C = configuration


def _bad_values(spec):
  """[(kind, value)] that `spec` must refuse; a new kind of constraint must
  be added here too (the test fails on an unknown one)."""
  if isinstance(spec, C.Int):
    out = [('bool', True), ('float', 1.5), ('str', '1'), ('None', None)]
    for kind, value in (('zero', 0), ('negative', -1), ('too small',
                                                        (spec.low or 0) - 1)):
      if spec.low is not None and value < spec.low:
        out.append((kind, value))
    if spec.high is not None:
      out.append(('too large', spec.high + 1))
    return [(k, v) for k, v in out if v not in dict(spec.special)
            or isinstance(v, bool)]
  if isinstance(spec, C.Float):
    out = [('bool', True), ('str', '0.1'), ('None', None),
           ('nan', math.nan), ('inf', math.inf), ('-inf', -math.inf)]
    if spec.low is not None:
      out.append(('at the open low bound', spec.low) if spec.low_open
                 else ('below', spec.low - 1e-3))
      out.append(('negative', -1.0))
    if spec.high is not None:
      out.append(('at the open high bound', spec.high) if spec.high_open
                 else ('too large', spec.high + 1e-3))
    return out
  if isinstance(spec, C.Choice):
    if isinstance(spec.options[0], str):
      return [('unknown choice', 'nope'),
              ('upper case', spec.options[0].upper()),
              ('int', 1), ('None', None)]
    return [('unknown choice', max(spec.options) + 1), ('bool', True),
            ('str', str(spec.options[0])), ('None', None)]
  if isinstance(spec, C.Bool):
    return [('int', 1), ('str', 'True'), ('None', None)]
  if isinstance(spec, C.Str):
    return [('int', 3), ('None', None)] + ([('empty', '')] if spec.nonempty
                                           else [])
  if isinstance(spec, C.PositiveInts):
    order = ([('not increasing', (10, 10)), ('decreasing', (15, 10))]
             if spec.increasing else [('empty tuple', ())])
    return order + [('tuple with a 0', (0, 32, 64)),
            ('negative width', (4, -1)), ('float width', (1.5,)),
            ('bool width', (True,)), ('int', 5), ('str', '16,32'),
            ('None', None)]
  if isinstance(spec, C.FieldNames):
    return [('unknown name', 'seed,sede'), ('int', 3)]
  raise AssertionError(f'no bad values for the new constraint kind {spec!r}')


class _Fields(dict):
  """A config's fields with item and attribute access, holding any value
  (a ConfigDict casts some, e.g. True to 1.0 in a float field)."""
  __getattr__ = dict.__getitem__


def _config_with(name, value):
  """base_config()'s fields with `name` (a namespace's as 'ns.field') set to
  `value`."""
  fields = _Fields(configuration.base_config().to_dict())
  *namespace, last = name.split('.')
  target = fields
  for part in namespace:
    inner = _Fields(target[part])
    target[part] = inner
    target = inner
  target[last] = value
  return fields


def test_every_schema_field_has_a_constraint():
  """The table covers exactly the schema, so a field added to base_config()
  without a constraint fails here (before the fix there was no table)."""
  assert set(C.CONSTRAINTS) == set(
      configuration.flat_fields(configuration.base_config()))


@pytest.mark.parametrize('name', sorted(C.CONSTRAINTS))
def test_validate_refuses_each_kind_of_bad_value(name):
  """Each bad value of each kind (wrong type, 0, negative, nan, inf, too
  large, unknown choice, empty tuple, tuple with a 0) is a ConfigError whose
  one line of <= 200 characters names the field and the value. Before the
  fix hdim=0, channels=(0, 32, 64), lr_e=nan, max_to_keep=0, the intervals
  at 0, num_train_steps=0, bools for ints, ... all passed."""
  bad = _bad_values(C.CONSTRAINTS[name])
  assert bad
  passed, unclear = [], []
  for kind, value in bad:
    try:
      configuration.validate(_config_with(name, value))
    except ConfigError as e:
      msg = str(e)
      if (f'{name}={value!r}' not in msg or '\n' in msg or len(msg) > 200):
        unclear.append((kind, msg))
    else:
      passed.append((kind, value))
  assert not passed, f'{name}: accepted {passed}'
  assert not unclear, f'{name}: unclear messages {unclear}'


@pytest.mark.parametrize('name, value', [
    ('eval_every_steps', 0), ('num_vae_steps', 0), ('num_processes', -1),
    ('process_id', -1), ('seed', 0), ('seed', 2**31 - 1), ('max_to_keep', 1),
    ('lr_e', 1.0), ('lr_g', 1), ('adam_b1', 0.0), ('weight_kl', 0.0),
    ('m_plus', 0), ('eval_split_fraction', 0.0), ('adam_eps', 1e-12),
    ('data_dir', ''), ('allow_changes', ' seed, dataset '),
    ('channels', [128, 256, 512, 512]), ('arch', 'mlp'),
    ('lr_boundaries', ()), ('lr_boundaries', [10, 20]), ('lr_decay', 1.0),
])
def test_validate_accepts_the_bounds(name, value):
  """The documented bounds and special values (0 = off, -1 = detect, an int
  for a float, a list for a tuple) are allowed, so the checks are not
  stricter than the code that uses the fields."""
  configuration.validate(_config_with(name, value))


def test_messages_say_what_is_allowed():
  """Each refusal says the allowed range or values (and why for learning
  rates and max_to_keep); before the fix these values passed silently."""
  cases = {('lr_e', math.nan): 'must be in (0, 1] (a learning rate',
           ('max_to_keep', 0): 'must be >= 1 (the newest checkpoints to keep)',
           ('log_every_steps', 0): 'log_every_steps=0 must be >= 1.',
           ('eval_every_steps', -1): 'or 0 to turn evaluation off',
           ('hdim', True): 'hdim=True has type bool; use an int >= 1',
           ('channels', (0, 32, 64)): 'non-empty tuple of ints >= 1',
           ('seed', -1): 'seed=-1 must be in [0, 2147483647]'}
  for (name, value), text in cases.items():
    with pytest.raises(ConfigError) as e:
      configuration.validate(_config_with(name, value))
    assert str(e.value).startswith('Invalid config: ')
    assert text in str(e.value), str(e.value)


def _recipes():
  return sorted(glob.glob(os.path.join(REPO_ROOT, 'configs', '[!_]*.py')))


@pytest.mark.parametrize('path', _recipes(), ids=os.path.basename)
def test_every_shipped_recipe_validates(path):
  """The recipes in configs/ stay within the constraints."""
  spec = importlib.util.spec_from_file_location('recipe', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  configuration.validate(module.get_config())


def _write_json(tmp_path, **changes):
  fields = json.loads(configuration.base_config().to_json_best_effort())
  fields.update(changes)
  path = tmp_path / 'config.json'
  path.write_text(json.dumps(fields))
  return str(path)


def test_load_json_round_trips_a_saved_config(tmp_path):
  """A config.json as the training loop writes it (tuples as lists) loads
  back to the same config."""
  config = configuration.load_json(_write_json(tmp_path))
  assert config.to_dict() == configuration.base_config().to_dict()
  assert isinstance(config.channels, tuple)


@pytest.mark.parametrize('field, value, shown', [
    ('hdim', '32', "hdim='32' has type str"),
    ('random_flip', 1, 'random_flip=1 has type int'),
    ('channels', [0, 32], 'channels=(0, 32) must be'),
    ('max_to_keep', 0, 'max_to_keep=0 must be >= 1'),
    ('lr_e', 'nan', "lr_e='nan' has type str"),
])
def test_load_json_refuses_a_bad_field_in_one_line(tmp_path, field, value,
                                                   shown):
  """A hand-edited config.json with a wrong-typed or out-of-range field is a
  ConfigError naming the file and the field in one line; before the fix a
  wrong type was a TypeError traceback (in `sample`, `evaluation`) and an
  out-of-range value loaded."""
  path = _write_json(tmp_path, **{field: value})
  with pytest.raises(ConfigError) as e:
    configuration.load_json(path)
  msg = str(e.value)
  assert msg.startswith(f'{path} holds an invalid field: {shown}'), msg
  assert '\n' not in msg and len(msg) <= 200 + len(path), msg


def test_config_json_that_is_a_folder_is_one_line(tmp_path):
  """Before: an IsADirectoryError traceback from the tools."""
  (tmp_path / 'config.json').mkdir()
  with pytest.raises(ConfigError, match='is a folder, not a config file'):
    configuration.load_json(str(tmp_path / 'config.json'))
