"""The authors' PyTorch IntroVAE (and Soft-IntroVAE's iteration), restated
for parity tests and benchmarks.

Test and benchmark only: it lives in tests/, not in the package (the wheel
holds no torch code), and imports torch (requirements-dev.txt). It restates
hhb072/IntroVAE `networks.py` (model) and `main.py` (`train` and
`train_vae`, one iteration each) in this project's words. Module and
attribute names are the reference's, so `state_dict()` keys are the reference
checkpoints' keys (`encoder.main.res_in_32.conv1.weight`,
`decoder.fc.0.weight`, ...); images are NCHW as in the reference.

Hyperparameters come from this project's config fields (`m_plus`,
`weight_rec`, `weight_kl`, `weight_neg`, `lr_e`, `lr_g`, `adam_*`), so one
ConfigDict drives both implementations. The random draws (eps of the
reparameterisation, z_p of the prior) are arguments, so both sides can use the
same numbers.
"""

import collections
import contextlib
from typing import Dict, Sequence

import torch
from torch import nn

# CPython shares int objects up to 256; larger ints parsed separately are
# distinct objects (see `skip_has_conv`).
_SHARED_INT_MAX = 256


def skip_has_conv(c_in: int, c_out: int, two_entries: bool,
                  reference_layout: bool = True) -> bool:
  """Whether a residual block carries a 1x1 convolution on its skip path.

  The reference decides with `inc is not outc` on ints parsed one by one from
  its `--channels` string. Different widths always get the convolution; equal
  widths get one too when they come from two list entries and are larger than
  256, since CPython then holds them as two objects (the 512 -> 512 blocks of
  every reference recipe). `reference_layout=False` is the intended rule
  (a convolution only for a change of width).
  """
  if c_in != c_out:
    return True
  return reference_layout and two_entries and c_in > _SHARED_INT_MAX


class ResidualBlock(nn.Module):
  """Reference `_Residual_Block` (scale 1, groups 1): BN and activation after
  the add; `bn_before_add`: Soft-IntroVAE's `ResidualBlock`
  (`train_soft_intro_vae.py` l. 38-75), bn2 on the branch before the add."""

  def __init__(self, c_in: int, c_out: int, skip_conv: bool,
               bn_before_add: bool = False):
    super().__init__()
    self.bn_before_add = bn_before_add
    self.conv_expand = (nn.Conv2d(c_in, c_out, 1, bias=False)
                        if skip_conv else None)
    self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(c_out)
    self.relu1 = nn.LeakyReLU(0.2)
    self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(c_out)
    self.relu2 = nn.LeakyReLU(0.2)

  def forward(self, x):
    skip = x if self.conv_expand is None else self.conv_expand(x)
    h = self.conv2(self.relu1(self.bn1(self.conv1(x))))
    if self.bn_before_add:
      return self.relu2(self.bn2(h) + skip)
    return self.relu2(self.bn2(h + skip))


def _check_size(channels, image_size, base):
  if base * 2 ** len(channels) != image_size:
    raise ValueError(f'channels={tuple(channels)} and base={base} need '
                     f'image_size={base * 2 ** len(channels)}, got '
                     f'{image_size}.')


class Encoder(nn.Module):
  """x [B, C, H, W] -> (mu, logvar); reference `Encoder`."""

  def __init__(self, image_channels: int, hdim: int, channels: Sequence[int],
               image_size: int, reference_layout: bool = True, base: int = 4,
               bn_before_add: bool = False):
    super().__init__()
    _check_size(channels, image_size, base)
    c = channels[0]
    self.main = nn.Sequential(
        nn.Conv2d(image_channels, c, 5, padding=2, bias=False),
        nn.BatchNorm2d(c), nn.LeakyReLU(0.2), nn.AvgPool2d(2))
    size = image_size // 2
    for c_next in channels[1:]:
      self.main.add_module(
          f'res_in_{size}',
          ResidualBlock(c, c_next, skip_has_conv(c, c_next, True,
                                                 reference_layout),
                        bn_before_add))
      self.main.add_module(f'down_to_{size // 2}', nn.AvgPool2d(2))
      c, size = c_next, size // 2
    # One list entry paired with itself: never a skip convolution.
    self.main.add_module(f'res_in_{size}',
                         ResidualBlock(c, c, False, bn_before_add))
    self.fc = nn.Linear(c * base * base, 2 * hdim)

  def forward(self, x):
    h = self.main(x).reshape(x.shape[0], -1)   # NCHW flatten order
    mu, logvar = self.fc(h).chunk(2, dim=1)
    return mu, logvar


class Decoder(nn.Module):
  """z [B, hdim] -> image [B, C, H, W] (linear output); reference `Decoder`.

  `base` is the side of the map the dense layer writes; the blocks are named
  `res_in_4`, `res_in_8`, ... whatever it is, as Soft-IntroVAE names them."""

  def __init__(self, image_channels: int, hdim: int, channels: Sequence[int],
               image_size: int, reference_layout: bool = True, base: int = 4,
               bn_before_add: bool = False):
    super().__init__()
    _check_size(channels, image_size, base)
    c = channels[-1]
    self.base = base
    self.fc = nn.Sequential(nn.Linear(hdim, c * base * base), nn.ReLU())
    self.main = nn.Sequential()
    size = 4
    # Walking the list backwards, the first block pairs the last entry with
    # itself (one list entry); later blocks pair two adjacent entries.
    prev = len(channels) - 1
    for i in reversed(range(len(channels))):
      c_next = channels[i]
      self.main.add_module(
          f'res_in_{size}',
          ResidualBlock(c, c_next, skip_has_conv(c, c_next, prev != i,
                                                 reference_layout),
                        bn_before_add))
      self.main.add_module(f'up_to_{size * 2}',
                           nn.Upsample(scale_factor=2, mode='nearest'))
      c, size, prev = c_next, size * 2, i
    self.main.add_module(f'res_in_{size}',
                         ResidualBlock(c, c, False, bn_before_add))
    self.main.add_module('predict', nn.Conv2d(c, image_channels, 5, padding=2))

  def forward(self, z):
    h = self.fc(z.reshape(z.shape[0], -1))
    return self.main(h.reshape(z.shape[0], -1, self.base, self.base))


class IntroVAE(nn.Module):
  """Reference `IntroVAE`: holds `encoder` and `decoder` (checkpoint key
  prefixes)."""

  def __init__(self, image_channels: int, hdim: int, channels: Sequence[int],
               image_size: int, reference_layout: bool = True, base: int = 4,
               bn_before_add: bool = False):
    super().__init__()
    args = (image_channels, hdim, tuple(channels), image_size, reference_layout,
            base, bn_before_add)
    self.encoder = Encoder(*args)
    self.decoder = Decoder(*args)


def build_model(config, dtype=torch.float32) -> IntroVAE:
  """The reference model for this project's config (its model fields; with
  residual_block='soft_introvae', Soft-IntroVAE's block)."""
  model = IntroVAE(config.image_channels, config.hdim, tuple(config.channels),
                   config.image_size, config.reference_layout,
                   config.base_size,
                   config.residual_block == 'soft_introvae')
  return model.to(dtype).train()


def make_optimizers(model: IntroVAE, config):
  """The reference's `optimizerE` and `optimizerG` (torch Adam)."""
  adam = lambda params, lr: torch.optim.Adam(
      params, lr=lr, betas=(config.adam_b1, config.adam_b2),
      eps=config.adam_eps)
  return (adam(model.encoder.parameters(), config.lr_e),
          adam(model.decoder.parameters(), config.lr_g))


def kl_divergence(mu, logvar):
  """Per-example KL to N(0, I); reference `kl_loss`."""
  return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=-1)


def reconstruction_loss(x, x_rec):
  """Per-example sum of squared errors; reference `reconstruction_loss`."""
  return (x_rec - x).pow(2).reshape(x.shape[0], -1).sum(dim=-1)


def reparameterize(mu, logvar, eps):
  """z = mu + eps * exp(0.5 * logvar); eps injected instead of drawn."""
  return eps * (0.5 * logvar).exp() + mu


def _grads(module: nn.Module) -> Dict[str, torch.Tensor]:
  return collections.OrderedDict(
      (name, p.grad.detach().clone()) for name, p in module.named_parameters())


def vae_iteration(model: IntroVAE, opt_e, opt_g, x, eps, *,
                  keep_grads: bool = True, weight_rec: float = 1.0,
                  weight_kl: float = 1.0) -> dict:
  """One warm-up iteration (reference `train_vae`): loss = L_AE + KL, both
  step (Soft-IntroVAE's warm-up: beta_rec * L_AE + beta_kl * KL)."""
  mu, logvar = model.encoder(x)
  x_rec = model.decoder(reparameterize(mu, logvar, eps))
  loss_rec = reconstruction_loss(x, x_rec).mean()
  kl_real = kl_divergence(mu, logvar).mean()
  loss = weight_rec * loss_rec + weight_kl * kl_real
  opt_g.zero_grad()
  opt_e.zero_grad()
  loss.backward()
  # The reference has one warm-up loss for both networks (reported as loss_e);
  # it defines no separate decoder loss or KLs of fakes.
  out = dict(loss_rec=loss_rec, kl_real=kl_real, loss_e=loss)
  if keep_grads:
    out.update(grads_e=_grads(model.encoder), grads_g=_grads(model.decoder))
  opt_e.step()
  opt_g.step()
  return {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}


def introspective_iteration(model: IntroVAE, opt_e, opt_g, x, eps, z_p, config,
                            *, keep_grads: bool = True,
                            full_backward: bool = False) -> dict:
  """One adversarial iteration, call by call as the reference's `train`.

  Calls, in order (BatchNorm in train mode for each, so each normalises its
  own batch and updates the running statistics in this order): decoder(z_p);
  encoder(x); decoder(z); encoder(x_rec.detach()); encoder(x_p.detach()); the
  encoder's Adam step on L_E; encoder'(x_rec); encoder'(x_p) with the updated
  weights; the decoder's Adam step. The decoder's gradient is that of
  w_rec * L_AE (from L_E's backward pass; the reference's
  `optimizerG.zero_grad()` before the G step is commented out) plus that of
  L_G's KL terms.

  In-place mutation: the reference calls `lossG.backward()` on a graph that
  still holds encoder(x)'s saved weights, which `optimizerE.step()` has just
  changed in place; PyTorch >= 1.5 refuses that ("modified by an inplace
  operation"). The only products of that stale part of the graph are encoder
  weight gradients, which the reference throws away (both `zero_grad()`s run
  before the next use). We choose `backward(inputs=decoder parameters)`:
  autograd then runs only the nodes on paths to the decoder weights (encoder'
  on the fakes, then the decoder's retained graph, whose saved tensors are
  untouched since the decoder has not stepped yet), so every number that
  reaches an optimizer is computed by the same operations on the same values
  as in the reference, and the stale encoder backward (wasted work in the
  reference) is not run. `full_backward=True` runs the reference's whole
  backward pass under `torch.autograd.graph.allow_mutation_on_saved_tensors`
  instead (saved tensors are cloned before the in-place step); a test checks
  both give the same decoder gradient.

  Returns the loss terms (detached) and, with `keep_grads`, the gradients each
  optimizer stepped on: `grads_e` (of L_E), `grads_g` (total), and
  `grads_g_from_loss_e` (the kept w_rec * L_AE part).
  """
  w_rec, w_kl, w_neg, m = (config.weight_rec, config.weight_kl,
                           config.weight_neg, config.m_plus)
  relu = torch.nn.functional.relu
  ctx = (torch.autograd.graph.allow_mutation_on_saved_tensors()
         if full_backward else contextlib.nullcontext())
  out = {}
  with ctx:
    # ---- Encoder update.
    x_fake = model.decoder(z_p)
    mu, logvar = model.encoder(x)
    x_rec = model.decoder(reparameterize(mu, logvar, eps))
    mu_r, logvar_r = model.encoder(x_rec.detach())
    mu_p, logvar_p = model.encoder(x_fake.detach())
    loss_rec = reconstruction_loss(x, x_rec).mean()
    kl_real = kl_divergence(mu, logvar).mean()
    kl_rec = kl_divergence(mu_r, logvar_r).mean()
    kl_fake = kl_divergence(mu_p, logvar_p).mean()
    margin = kl_real + (relu(m - kl_rec) + relu(m - kl_fake)) * 0.5 * w_neg
    loss_e = loss_rec * w_rec + margin * w_kl
    opt_g.zero_grad()
    opt_e.zero_grad()
    loss_e.backward(retain_graph=True)
    if keep_grads:
      out.update(grads_e=_grads(model.encoder),
                 grads_g_from_loss_e=_grads(model.decoder))
    opt_e.step()

    # ---- Decoder update: the fakes (not detached) through the updated encoder.
    mu_r, logvar_r = model.encoder(x_rec)
    mu_p, logvar_p = model.encoder(x_fake)
    kl_rec_g = kl_divergence(mu_r, logvar_r).mean()
    kl_fake_g = kl_divergence(mu_p, logvar_p).mean()
    loss_g_kl = (kl_rec_g + kl_fake_g) * 0.5 * w_kl
    # No opt_g.zero_grad(): the w_rec * L_AE gradient above is kept.
    if full_backward:
      loss_g_kl.backward()
    else:
      loss_g_kl.backward(inputs=list(model.decoder.parameters()))
    if keep_grads:
      out.update(grads_g=_grads(model.decoder))
    opt_g.step()

  out.update(loss_rec=loss_rec, kl_real=kl_real, kl_rec=kl_rec,
             kl_fake=kl_fake, kl_rec_g=kl_rec_g, kl_fake_g=kl_fake_g,
             loss_e=loss_e,
             # This project's L_G includes the kept reconstruction term.
             loss_g=w_rec * loss_rec + loss_g_kl)
  return {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}


def iteration(model: IntroVAE, opt_e, opt_g, x, eps, z_p, config, step: int,
              **kwargs) -> dict:
  """Warm-up iteration while `step < config.num_vae_steps`, else adversarial."""
  if step < config.num_vae_steps:
    kwargs.pop('full_backward', None)
    return vae_iteration(model, opt_e, opt_g, x, eps, **kwargs)
  return introspective_iteration(model, opt_e, opt_g, x, eps, z_p, config,
                                 **kwargs)


def _step(opt, loss, module: nn.Module, out: dict, grads_key) -> None:
  """zero_grad, backward, the gradients into out[grads_key] (if given), step."""
  opt.zero_grad()
  loss.backward()
  if grads_key:
    out[grads_key] = _grads(module)
  opt.step()


def _trainable(module: nn.Module, flag: bool) -> None:
  for p in module.parameters():
    p.requires_grad = flag


def soft_introvae_iteration(model: IntroVAE, opt_e, opt_g, x, noise, config,
                            *, keep_grads: bool = True) -> dict:
  """One Soft-IntroVAE iteration, call by call as taldatech/soft-intro-vae-
  pytorch `train_soft_intro_vae.py` (b6dbf16, l. 542-624), with its six
  random draws injected: `noise` maps 'eps', 'z_p', 'eps_rec', 'eps_fake'
  (E step), 'eps_rec_g', 'eps_fake_g' (D step) to [B, hdim] tensors. The
  networks are whatever `model` holds (the objective does not depend on the
  block variant). Returns the loss terms (detached) and, with `keep_grads`,
  the gradients each optimiser stepped on.
  """
  hp = config.soft_introvae
  b_rec, b_kl, b_neg, gamma_r = hp.beta_rec, hp.beta_kl, hp.beta_neg, hp.gamma_r
  scale = 1 / x[0].numel()
  out = {}
  # ---- Encoder update (l. 551-589): the decoder frozen.
  _trainable(model.encoder, True)
  _trainable(model.decoder, False)
  fake = model.decoder(noise['z_p'])
  mu, logvar = model.encoder(x)
  z = reparameterize(mu, logvar, noise['eps'])
  rec = model.decoder(z)
  loss_rec = reconstruction_loss(x, rec).mean()
  kl_real = kl_divergence(mu, logvar).mean()
  rec_mu, rec_logvar = model.encoder(rec.detach())
  rec_rec = model.decoder(reparameterize(rec_mu, rec_logvar, noise['eps_rec']))
  fake_mu, fake_logvar = model.encoder(fake.detach())
  rec_fake = model.decoder(reparameterize(fake_mu, fake_logvar,
                                          noise['eps_fake']))
  kl_rec = kl_divergence(rec_mu, rec_logvar)
  kl_fake = kl_divergence(fake_mu, fake_logvar)
  # The target `rec` is not detached (their `loss_rec_rec_e`).
  err_rec = reconstruction_loss(rec, rec_rec)
  err_fake = reconstruction_loss(fake, rec_fake)
  expelbo_rec = (-2 * scale * (b_rec * err_rec + b_neg * kl_rec)).exp().mean()
  expelbo_fake = (-2 * scale * (b_rec * err_fake
                                + b_neg * kl_fake)).exp().mean()
  loss_e = (scale * (b_rec * loss_rec + b_kl * kl_real)
            + 0.25 * (expelbo_rec + expelbo_fake))
  _step(opt_e, loss_e, model.encoder, out, 'grads_e' if keep_grads else None)

  # ---- Decoder update (l. 591-624): the encoder frozen, after its step.
  _trainable(model.encoder, False)
  _trainable(model.decoder, True)
  fake = model.decoder(noise['z_p'])
  rec = model.decoder(z.detach())
  loss_rec_g = reconstruction_loss(x, rec).mean()
  rec_mu, rec_logvar = model.encoder(rec)
  z_rec = reparameterize(rec_mu, rec_logvar, noise['eps_rec_g'])
  fake_mu, fake_logvar = model.encoder(fake)
  z_fake = reparameterize(fake_mu, fake_logvar, noise['eps_fake_g'])
  rec_rec = model.decoder(z_rec.detach())
  rec_fake = model.decoder(z_fake.detach())
  loss_rec_rec = reconstruction_loss(rec.detach(), rec_rec).mean()
  loss_fake_rec = reconstruction_loss(fake.detach(), rec_fake).mean()
  kl_rec_g = kl_divergence(rec_mu, rec_logvar).mean()
  kl_fake_g = kl_divergence(fake_mu, fake_logvar).mean()
  loss_g = scale * (b_rec * loss_rec_g + 0.5 * b_kl * (kl_rec_g + kl_fake_g)
                    + gamma_r * 0.5 * b_rec * (loss_rec_rec + loss_fake_rec))
  _step(opt_g, loss_g, model.decoder, out, 'grads_g' if keep_grads else None)
  _trainable(model.encoder, True)

  out.update(loss_rec=loss_rec, kl_real=kl_real, kl_rec=kl_rec.mean(),
             kl_fake=kl_fake.mean(), kl_rec_g=kl_rec_g, kl_fake_g=kl_fake_g,
             expelbo_rec=expelbo_rec, expelbo_fake=expelbo_fake,
             loss_rec_rec=loss_rec_rec, loss_fake_rec=loss_fake_rec,
             loss_e=loss_e, loss_g=loss_g)
  return {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}


def soft_introvae_step(model: IntroVAE, opt_e, opt_g, x, noise, config,
                       step: int, **kwargs) -> dict:
  """Their warm-up (one joint step of beta_rec * L_AE + beta_kl * KL, no
  scale; l. 512-533) while `step < config.num_vae_steps`, else the
  Soft-IntroVAE iteration."""
  if step < config.num_vae_steps:
    hp = config.soft_introvae
    return vae_iteration(model, opt_e, opt_g, x, noise['eps'],
                         weight_rec=hp.beta_rec, weight_kl=hp.beta_kl, **kwargs)
  return soft_introvae_iteration(model, opt_e, opt_g, x, noise, config,
                                 **kwargs)


def adam_states(optimizer, module: nn.Module) -> Dict[str, dict]:
  """{parameter name: {'step', 'exp_avg', 'exp_avg_sq'}} of a torch Adam."""
  return collections.OrderedDict(
      (name, optimizer.state[p]) for name, p in module.named_parameters())
