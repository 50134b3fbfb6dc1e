"""bench/authors_loop.py: its edits to the authors' files and the one that
changes their IntroVAE loop's order of work (decoder_backward)."""

import importlib.util
import os

import pytest

torch = pytest.importorskip('torch')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _authors_loop():
  spec = importlib.util.spec_from_file_location(
      'authors_loop', os.path.join(REPO, 'bench', 'authors_loop.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _Encoder(torch.nn.Module):

  def __init__(self, hdim):
    super().__init__()
    self.conv = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
    self.bn = torch.nn.BatchNorm2d(4)
    self.fc = torch.nn.Linear(4 * 4 * 4, 2 * hdim)

  def forward(self, x):
    y = torch.nn.functional.leaky_relu(self.bn(self.conv(x)), 0.2)
    return self.fc(y.flatten(1)).chunk(2, dim=1)


class _Decoder(torch.nn.Module):

  def __init__(self, hdim):
    super().__init__()
    self.fc = torch.nn.Linear(hdim, 4 * 4 * 4)
    self.conv = torch.nn.Conv2d(4, 1, 3, padding=1)

  def forward(self, z):
    return self.conv(torch.relu(self.fc(z)).view(-1, 4, 4, 4))


def _kl(mu, logvar):
  return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean()


class _Torch04Adam(torch.optim.Adam):
  """torch 0.4's Adam wrote the new weights through `.data`, which autograd
  does not see: a later backward through a graph saved before the step ran
  (against the new values) instead of being refused."""

  def step(self, closure=None):
    shadows = [p.detach().clone() for g in self.param_groups
               for p in g['params']]
    params = [p for g in self.param_groups for p in g['params']]
    for p, s in zip(params, shadows):
      s.grad = p.grad
    state = self.state
    self.state = _Shadowed(state, params, shadows)
    groups = self.param_groups
    self.param_groups = [dict(g, params=shadows) for g in groups]
    try:
      super().step(closure)
    finally:
      self.param_groups = groups
      self.state = state
    for p, s in zip(params, shadows):
      p.data.copy_(s)


class _Shadowed(dict):
  """The optimizer's per-parameter state, keyed by the shadow copies."""

  def __init__(self, state, params, shadows):
    super().__init__()
    self._state, self._by_shadow = state, dict(zip(map(id, shadows), params))

  def __getitem__(self, shadow):
    return self._state[self._by_shadow[id(shadow)]]

  def __contains__(self, shadow):
    return id(shadow) in self._by_shadow


def _their_iteration(enc, dec, opt_e, opt_g, real, noise, eps, backward_g):
  """hhb072/IntroVAE main.py's train(), step for step (m_plus 5, weights 1)."""
  fake = dec(noise)
  real_mu, real_logvar = enc(real)
  z = eps * (0.5 * real_logvar).exp() + real_mu
  rec = dec(z)
  rec_mu, rec_logvar = enc(rec.detach())
  fake_mu, fake_logvar = enc(fake.detach())
  loss_rec = ((rec - real) ** 2).flatten(1).sum(-1).mean()
  loss_margin = _kl(real_mu, real_logvar) + 0.5 * (
      torch.relu(5 - _kl(rec_mu, rec_logvar))
      + torch.relu(5 - _kl(fake_mu, fake_logvar)))
  opt_g.zero_grad()
  opt_e.zero_grad()
  (loss_rec + loss_margin).backward(retain_graph=True)
  opt_e.step()
  rec_mu, rec_logvar = enc(rec)
  fake_mu, fake_logvar = enc(fake)
  loss_g = 0.5 * (_kl(rec_mu, rec_logvar) + _kl(fake_mu, fake_logvar))
  backward_g(loss_g)
  opt_g.step()


def _run(opt_cls, backward_g, iterations=2):
  torch.manual_seed(0)
  enc, dec = _Encoder(3).double(), _Decoder(3).double()
  opt_e = opt_cls(enc.parameters(), lr=1e-2)
  opt_g = opt_cls(dec.parameters(), lr=1e-2)
  draws = torch.Generator().manual_seed(1)
  for _ in range(iterations):
    real = torch.rand(5, 1, 4, 4, generator=draws, dtype=torch.float64)
    noise = torch.randn(5, 3, generator=draws, dtype=torch.float64)
    eps = torch.randn(5, 3, generator=draws, dtype=torch.float64)
    _their_iteration(enc, dec, opt_e, opt_g, real, noise, eps,
                     lambda loss: backward_g(loss, dec))
  return {**{f'e.{k}': v for k, v in enc.state_dict().items()},
          **{f'g.{k}': v for k, v in dec.state_dict().items()}}


def test_current_torch_refuses_their_unmodified_decoder_backward():
  with pytest.raises(RuntimeError, match='modified by an inplace operation'):
    _run(torch.optim.Adam, lambda loss, dec: loss.backward())


def test_the_decoder_backward_shim_trains_as_torch_0_4_ran_their_loop():
  """Two iterations: every weight and BatchNorm statistic of both networks
  agrees with the unmodified order run under torch 0.4's update, so the
  encoder gradients the shim leaves out were never used."""
  theirs = _run(_Torch04Adam, lambda loss, dec: loss.backward())
  shimmed = _run(torch.optim.Adam, lambda loss, dec: loss.backward(
      inputs=list(dec.parameters())))
  assert theirs.keys() == shimmed.keys()
  first = _run(torch.optim.Adam, lambda loss, dec: loss.backward(
      inputs=list(dec.parameters())), iterations=1)
  for key, value in theirs.items():
    torch.testing.assert_close(shimmed[key], value, rtol=1e-13, atol=1e-15)
    if value.is_floating_point() and 'running' not in key:
      # The second iteration moved it: the comparison is not vacuous.
      assert not torch.equal(first[key], value), key


def test_the_shim_is_the_edit_the_script_makes():
  loop = _authors_loop()
  (edit,) = [e for e in loop.EDITS['introvae'] if e[4] == 'decoder_backward']
  assert edit[1].strip() == 'lossG.backward()'
  assert edit[2].strip() == (
      'lossG.backward(inputs=list(model.decoder.parameters()))')
  # Every edit is a listed shim or one of the comparison's inputs.
  names = {e[4] for edits in loop.EDITS.values() for e in edits}
  assert names <= set(loop.SHIMS) | set(loop.INPUTS)


def test_an_edit_that_does_not_match_exactly_is_refused(tmp_path):
  loop = _authors_loop()
  (tmp_path / 'main.py').write_text(
      'x = loss.data[0]\n        lossG.backward()\nIntroVAE(cdim=3, a)\n')
  with pytest.raises(loop.EditError, match="'data_item' edit expects"):
    loop.edited_source(str(tmp_path), 'main.py', loop.EDITS['introvae'])
  text = ''.join(['y = a.data[0]\n'] * 8
                 + ['        lossG.backward()\n', 'IntroVAE(cdim=3, a)\n'])
  (tmp_path / 'main.py').write_text(text)
  edited = loop.edited_source(str(tmp_path), 'main.py', loop.EDITS['introvae'])
  assert edited.count('.item()') == 8 and '.data[0]' not in edited
  assert 'IntroVAE(cdim=_CHANNELS, a)' in edited


def test_their_data_loader_gives_the_batches_in_order_as_standard_nchw(
    tmp_path):
  """Each pass over it is one of their epochs: the file's next batches, in
  order, with the strides torch's own collate gives (a 1-channel permute
  keeps strides torch reads as channels-last, which their `.view` refuses)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  loop = _authors_loop()
  images = np.random.default_rng(0).random((4, 2, 3, 3, 1), np.float32)
  np.save(tmp_path / 'b.npy', images)
  batches = loop.Batches(str(tmp_path / 'b.npy'), steps_per_epoch=2)
  epochs = [list(batches), list(batches), list(batches)]
  assert [len(e) for e in epochs] == [2, 2, 0] and len(batches) == 2
  for i, batch in enumerate(epochs[0] + epochs[1]):
    assert batch.shape == (2, 1, 3, 3)
    assert batch.stride() == (9, 9, 3, 1)
    np.testing.assert_array_equal(batch.numpy(),
                                  images[i].transpose(0, 3, 1, 2))
