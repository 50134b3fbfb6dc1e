"""Soft-IntroVAE against its authors' code (taldatech/soft-intro-vae-pytorch
b6dbf16), restated in PyTorch.

- the iteration (`torch_reference.soft_introvae_iteration`): loss terms in
  float32 (1e-5 relative to the float64 reference); parameters, Adam moments
  (after the first step, the gradients) and BatchNorm statistics after 3
  iterations, warm-up included, in float64 at 1e-7 relative, the tolerances
  of the IntroVAE parity tests (docs/introvae.md, section 8);
- their networks: the image encoder/decoder with their residual block
  (`residual_block='soft_introvae'`), and the 2-D MLPs.
"""

import jax
import numpy as np
import pytest

from introvae_jax import objectives
from introvae_jax import step as step_lib
from conftest import in_subprocess, tiny_config

torch = pytest.importorskip('torch', reason='parity tests need torch: '
                            'pip install -r requirements-dev.txt')
import test_parity_torch as parity  # pylint: disable=g-import-not-at-top
import torch_reference as tr  # pylint: disable=g-import-not-at-top  (tests/)

NOISE = objectives.soft_introvae.NOISE
LOSS_TERMS = ('loss_rec', 'kl_real', 'kl_rec', 'kl_fake', 'kl_rec_g',
              'kl_fake_g', 'expelbo_rec', 'expelbo_fake', 'loss_rec_rec',
              'loss_fake_rec', 'loss_e', 'loss_g')


def soft_config(**overrides):
  """The parity model (32 px, widths 4, 8, 8) with betas all different and
  gamma_r large enough that the fakes' reconstruction term shows; beta_neg
  puts the expELBO terms near exp(-1), where their gradients are large."""
  config = parity.small_config(objective='soft_introvae', **overrides)
  hp = config.soft_introvae
  hp.beta_rec, hp.beta_kl, hp.beta_neg, hp.gamma_r = 0.8, 0.6, 64.0, 0.5
  return config


def soft_draws(config, steps, seed, dtype):
  """Images (8-bit levels) and the six draws per iteration."""
  rng = np.random.default_rng(seed)
  b, s, h = config.batch_size, config.image_size, config.hdim
  return [((rng.integers(0, 256, (b, s, s, 3)) / 256).astype(dtype),
           [rng.standard_normal((b, h)).astype(dtype) for _ in NOISE])
          for _ in range(steps)]


def run_torch(model, opts, x, noise, config, step, dtype):
  return tr.soft_introvae_step(
      model, *opts, parity.to_torch(x.transpose(0, 3, 1, 2), dtype),
      {k: parity.to_torch(a, dtype) for k, a in zip(NOISE, noise)}, config,
      step, keep_grads=False)


def test_soft_introvae_loss_terms_match_in_float32():
  config = soft_config()
  state = parity.jax_state(config)
  (x, noise), = soft_draws(config, 1, seed=5, dtype=np.float32)
  _, metrics = step_lib.make_train_step(config, pmap=False, donate=False)(
      state, x, noise=tuple(noise))
  model, opts = parity.torch_twin(state, config, torch.float64)
  ref = run_torch(model, opts, x, noise, config, 0, torch.float64)
  for k in LOSS_TERMS:
    err = parity.rel_err(metrics[k], ref[k].numpy())
    assert err < 1e-5, (k, err, float(metrics[k]), float(ref[k]))
  # Every term of both losses is a sizeable share (else a dropped one hides).
  s = 1 / (3 * 32 * 32)
  hp = config.soft_introvae
  real = s * (hp.beta_rec * float(ref['loss_rec']) + hp.beta_kl
              * float(ref['kl_real']))
  fake = 0.25 * float(ref['expelbo_rec'] + ref['expelbo_fake'])
  assert 0.05 < fake / real < 20, (fake, real)


X64 = in_subprocess('x64', {'JAX_ENABLE_X64': '1'})


@X64
def test_soft_introvae_three_iterations_match_in_float64():
  """Warm-up (step 0), then two Soft-IntroVAE iterations: every parameter,
  Adam moment and BatchNorm statistic, and the loss terms, after each."""
  assert jax.config.jax_enable_x64, 'needs JAX_ENABLE_X64=1'
  config = soft_config(dtype='float64', num_vae_steps=1)
  state = parity.jax_state(config, 0, np.float64)
  model, opts = parity.torch_twin(state, config, torch.float64)
  step = step_lib.make_train_step(config, pmap=False, donate=False)
  failures = []
  for i, (x, noise) in enumerate(soft_draws(config, 3, 6, np.float64)):
    state, metrics = step(state, x, noise=tuple(noise))
    out = run_torch(model, opts, x, noise, config, i, torch.float64)
    errs = parity.compare_states(state, model, *opts)
    errs['losses'] = parity.worst({k: (metrics[k], out[k]) for k in out})
    assert float(metrics['vae_phase']) == (i == 0)
    failures += [(i, what, err, name) for what, (err, name) in errs.items()
                 if err > 1e-7]
  assert not failures, failures


def _their_mlp(in_dim, out_dim, n_layers=3, width=256):
  """Soft-IntroVAE's `EncoderSimple`/`DecoderSimple` main stack
  (`soft_intro_vae_2d/train_soft_intro_vae_2d.py` l. 402-444): Linear(in,
  256), ReLU, n_layers x (Linear(256, 256), ReLU), Linear(256, out)."""
  layers = [torch.nn.Linear(in_dim, width), torch.nn.ReLU()]
  for _ in range(n_layers):
    layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
  return torch.nn.Sequential(*layers, torch.nn.Linear(width, out_dim))


def test_their_2d_networks_are_mlp_hidden_of_four_256_layers():
  """`mlp_hidden=(256,) * 4` is their 2-D encoder and decoder (n_layers=3,
  num_hidden=256): the same parameter count (their decoder's extra scalar
  `loggamma` is never used in training) and the same outputs with the same
  weights. configs/toy2d.py keeps three layers (the committed IntroVAE
  grid) and says so."""
  import flax  # pylint: disable=g-import-not-at-top
  from introvae_jax import models  # pylint: disable=g-import-not-at-top
  config = tiny_config('mlp', mlp_hidden=(256,) * 4, hdim=2)
  encoder, decoder = models.build_models(config)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 2)).astype(np.float32)
  for module, inputs, out_dim in ((encoder, x, 4), (decoder, x, 2)):
    params = module.init(jax.random.PRNGKey(1), inputs)['params']
    theirs = _their_mlp(2, out_dim)
    n_ours = sum(a.size for a in jax.tree_util.tree_leaves(params))
    assert n_ours == sum(p.numel() for p in theirs.parameters()) == (
        2 * 256 + 256 + 3 * (256 * 256 + 256) + 256 * out_dim + out_dim)
    dense = [m for m in theirs if isinstance(m, torch.nn.Linear)]
    flat = flax.traverse_util.flatten_dict(params)
    names = [f'fc_{i}' for i in range(4)] + ['fc_out']
    with torch.no_grad():
      for name, layer in zip(names, dense):
        layer.weight.copy_(torch.from_numpy(
            np.asarray(flat[(name, 'kernel')]).T.copy()))
        layer.bias.copy_(torch.from_numpy(np.array(flat[(name, 'bias')])))
      want = theirs(torch.from_numpy(inputs)).numpy()
    got = module.apply({'params': params}, inputs)
    got = np.concatenate(got, -1) if isinstance(got, tuple) else got
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _their_block(inc, outc):
  """Soft-IntroVAE's `ResidualBlock` (`train_soft_intro_vae.py` l. 38-75,
  scale 1): a 1x1 skip convolution only when the widths differ (`!=`), bn2
  on the branch before the add."""
  return tr.ResidualBlock(inc, outc, skip_conv=inc != outc, bn_before_add=True)


def _their_networks(cdim, zdim, channels, image_size):
  """Their `Encoder` and `Decoder` (l. 78-169), unconditional, as a module
  whose state_dict keys are theirs (`encoder.main.res_in_16.conv1.weight`)."""
  nn = torch.nn
  model = nn.Module()
  cc = channels[0]
  enc = nn.Sequential(nn.Conv2d(cdim, cc, 5, 1, 2, bias=False),
                      nn.BatchNorm2d(cc), nn.LeakyReLU(0.2), nn.AvgPool2d(2))
  sz = image_size // 2
  for ch in channels[1:]:
    enc.add_module(f'res_in_{sz}', _their_block(cc, ch))
    enc.add_module(f'down_to_{sz // 2}', nn.AvgPool2d(2))
    cc, sz = ch, sz // 2
  enc.add_module(f'res_in_{sz}', _their_block(cc, cc))
  model.encoder = nn.Module()
  model.encoder.main = enc
  model.encoder.fc = nn.Linear(cc * sz * sz, 2 * zdim)
  base = sz  # their decoder's `conv_input_size`: the encoder's last map
  cc, sz = channels[-1], 4
  dec = nn.Sequential()
  for ch in channels[::-1]:
    dec.add_module(f'res_in_{sz}', _their_block(cc, ch))
    dec.add_module(f'up_to_{sz * 2}', nn.Upsample(scale_factor=2))
    cc, sz = ch, sz * 2
  dec.add_module(f'res_in_{sz}', _their_block(cc, cc))
  dec.add_module('predict', nn.Conv2d(cc, cdim, 5, 1, 2))
  model.decoder = nn.Module()
  model.decoder.fc = nn.Sequential(
      nn.Linear(zdim, channels[-1] * base * base), nn.ReLU())
  model.decoder.main = dec
  return model


@pytest.mark.parametrize('channels,size,base', [
    ((4, 8, 8), 32, 4), ((4, 8), 28, 7)], ids=['32px', '28px_mnist'])
def test_their_image_networks_are_the_soft_introvae_block(channels, size,
                                                           base):
  """residual_block='soft_introvae' with reference_layout=False is their
  image encoder and decoder: the same state_dict keys and shapes, the same
  outputs and running statistics after a train-mode call (float32). At
  28 px (their MNIST/FMNIST layout, widths scaled down) the decoder starts
  from their 7x7 map: base_size=7."""
  from introvae_jax import convert, models  # pylint: disable=g-import-not-at-top
  config = parity.small_config(residual_block='soft_introvae',
                               reference_layout=False, channels=channels,
                               image_size=size, base_size=base)
  state = parity.jax_state(config)
  theirs = _their_networks(3, config.hdim, channels, size).train()
  theirs.load_state_dict(convert.export_state_dict(state))  # strict: same keys
  x, z, _ = parity.draws(config, 1)[0]
  encoder, decoder = models.build_models(config)
  (mu, logvar), _ = objectives.base.apply(encoder, state.params_e,
                                          state.batch_stats_e, x)
  out, _ = objectives.base.apply(decoder, state.params_g, state.batch_stats_g,
                                 z)
  with torch.no_grad():
    t = theirs.encoder.main(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    t_mu, t_logvar = theirs.encoder.fc(t.reshape(len(x), -1)).chunk(2, 1)
    h = theirs.decoder.fc(torch.from_numpy(z)).reshape(
        len(z), channels[-1], base, base)
    t_out = theirs.decoder.main(h).permute(0, 2, 3, 1)
  for name, a, b in (('mu', mu, t_mu), ('logvar', logvar, t_logvar),
                     ('decoder output', out, t_out)):
    assert parity.rel_err(a, b.numpy()) < 1e-5, name
  # The IntroVAE block on the same weights computes something else.
  other = models.build_models(parity.small_config(
      reference_layout=False, channels=channels, image_size=size,
      base_size=base))[1]
  out_introvae, _ = objectives.base.apply(other, state.params_g,
                                          state.batch_stats_g, z)
  assert parity.rel_err(out_introvae, t_out.numpy()) > 1e-2


@pytest.mark.parametrize('recipe', ['soft_mnist', 'soft_cifar10',
                                    'soft_celeb256'])
def test_their_recipes_build_their_networks(recipe):
  """Each Soft-IntroVAE recipe builds their network for that data set at full
  width: its variables, exported, load into their modules with strict key
  and shape checking, with the same number of parameters."""
  import importlib  # pylint: disable=g-import-not-at-top
  from introvae_jax import checkpointing, convert  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{recipe}').get_config()
  abstract = checkpointing.abstract_state(config)
  zeros = {name: jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype), getattr(abstract, name))
           for name in ('params_e', 'batch_stats_e', 'params_g',
                        'batch_stats_g')}
  state_dict = convert.variables_to_torch_arrays(**zeros)
  theirs = _their_networks(config.image_channels, config.hdim,
                           tuple(config.channels), config.image_size)
  theirs.load_state_dict({k: torch.from_numpy(v)
                          for k, v in state_dict.items()}, strict=True)
  ours = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(
      (zeros['params_e'], zeros['params_g'])))
  assert ours == sum(p.numel() for p in theirs.parameters())
