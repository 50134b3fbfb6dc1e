"""Runs an author's own training loop, read from their checkout, on batches
given as a file; writes the trained state_dict.

Called by bench/outcome_parity.py under an interpreter with torch and
torchvision (their code imports both); needs neither JAX nor this project:

  python bench/authors_loop.py --objective=introvae --checkout=IntroVAE \\
      --batches=batches.npy --out=DIR --seed=0 --num_vae_steps=500 ...

Nothing of the authors' code is copied here. Their file is read at run time,
the text edits below are applied to it (each must match as often as
stated, so a different version of their file is refused, not silently
mis-edited), and it runs as written otherwise, with its own initialisation,
random draws, optimisers and update order.

Shims, the only changes that make their code run on a CPU under current
torch (SHIMS, listed by name in each result):
  cuda_identity   `.cuda()` on tensors and modules returns them unchanged.
  cuda_float      `torch.cuda.FloatTensor` is the CPU `torch.FloatTensor`.
  data_item       `loss.data[0]` (torch 0.3) reads `loss.item()`.
  data_parallel   `data_parallel(module, x)` is the plain call `module(x)`.
  decoder_backward  IntroVAE's `lossG.backward()` after `optimizerE.step()`
                  is refused by torch >= 1.5 (the encoder's weights saved for
                  backward were changed in place). It becomes
                  `lossG.backward(inputs=decoder parameters)`: the same
                  decoder gradients (all the update uses); it leaves out only
                  the encoder gradients of lossG, which their next
                  `optimizerE.zero_grad()` discards before any use (torch 0.4
                  computed them against the already-updated weights).
                  tests/test_outcome_parity.py checks it against the
                  unmodified order run with torch 0.4's in-place update.
  (Soft-IntroVAE's loop runs under current torch with no shim.)

Inputs, what the comparison sets (INPUTS): the data (this project's input
pipeline batches, in its order, through their loop's own `DataLoader`
name), the image shape and network widths (their IntroVAE `main.py` fixes
3 colour channels; Soft-IntroVAE's loop picks its shape from a data-set
name, to which one entry is added for the project's digits), and the
warm-up and budget, as their loops count them: epochs of
`--steps_per_epoch` batches.
"""

import argparse
import contextlib
import glob
import json
import os
import sys
import time
import types

import numpy as np
import torch

SHIMS = ('cuda_identity', 'cuda_float', 'data_item', 'data_parallel',
         'decoder_backward')
INPUTS = ('data', 'shape_and_widths', 'warm_up_and_budget')

# (file, old, new, count, name): the text edits, per objective.
EDITS = {
    'introvae': (
        ('main.py', '.data[0]', '.item()', 8, 'data_item'),
        ('main.py', '        lossG.backward()\n',
         '        lossG.backward(inputs=list(model.decoder.parameters()))\n',
         1, 'decoder_backward'),
        ('main.py', 'IntroVAE(cdim=3,', 'IntroVAE(cdim=_CHANNELS,', 1,
         'shape_and_widths'),
    ),
    'soft_introvae': (
        ('soft_intro_vae/train_soft_intro_vae.py',
         "    elif dataset == 'mnist':\n",
         "    elif dataset == 'project_digits':\n"
         '        image_size, channels, ch, train_set = _PROJECT_DIGITS\n'
         "    elif dataset == 'mnist':\n", 1, 'shape_and_widths'),
    ),
}
# Their entry files (run as modules) and the folder their imports start from.
ENTRY = {'introvae': ('main.py', '.'),
         'soft_introvae': ('soft_intro_vae/train_soft_intro_vae.py',
                           'soft_intro_vae')}


class EditError(RuntimeError):
  pass


def edited_source(checkout: str, path: str, edits) -> str:
  """Their file's text with `edits` applied; an `EditError` naming the edit
  when its text does not occur exactly as often as expected."""
  full = os.path.join(checkout, path)
  with open(full, encoding='utf-8') as f:
    text = f.read()
  for file, old, new, count, name in edits:
    if file != path:
      continue
    found = text.count(old)
    if found != count:
      raise EditError(
          f'{full}: the {name!r} edit expects {old!r} {count} time(s), found '
          f'{found}; this script knows the authors\' public code at '
          'hhb072/IntroVAE c8ce5d2 and taldatech/soft-intro-vae-pytorch '
          'b6dbf16: check out that revision.')
    text = text.replace(old, new)
  return text


def load_module(checkout: str, objective: str, name: str):
  """Their entry file, edited, as a fresh module (not run as __main__)."""
  path, folder = ENTRY[objective]
  source = edited_source(checkout, path, EDITS[objective])
  module = types.ModuleType(name)
  module.__file__ = os.path.join(checkout, path)
  sys.modules[name] = module
  code = compile(source, module.__file__, 'exec')
  with _cwd_on_path(os.path.join(checkout, folder)):
    exec(code, module.__dict__)  # pylint: disable=exec-used
  return module


@contextlib.contextmanager
def _cwd_on_path(folder):
  sys.path.insert(0, folder)
  try:
    yield
  finally:
    sys.path.remove(folder)


def install_shims():
  """cuda_identity, cuda_float (process-wide: this process runs their code
  only)."""
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  torch.nn.Module.cuda = lambda self, *args, **kwargs: self
  torch.cuda.FloatTensor = torch.FloatTensor


class Batches:
  """Their `DataLoader`: each pass yields the file's next `steps_per_epoch`
  batches, in its order, as NCHW tensors."""

  def __init__(self, path: str, steps_per_epoch: int):
    self.array = np.load(path, mmap_mode='r')
    self._per_epoch = steps_per_epoch
    self._next = 0

  def __len__(self):
    return self._per_epoch

  def __iter__(self):
    stop = min(self._next + self._per_epoch, len(self.array))
    while self._next < stop:
      nhwc = torch.from_numpy(np.array(self.array[self._next]))
      # Standard NCHW strides, as their DataLoader's collate makes (a 1-channel
      # permute keeps strides that torch reads as channels-last).
      images = torch.empty(nhwc.permute(0, 3, 1, 2).shape).copy_(
          nhwc.permute(0, 3, 1, 2))
      self._next += 1
      yield images


def run_introvae(args, batches: Batches) -> dict:
  """hhb072/IntroVAE main.py: `--num_vae` epochs of VAE, then IntroVAE."""
  with _cwd_on_path(args.checkout):  # main.py's `from networks import *`
    import networks  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  networks.data_parallel = lambda module, inputs, *a, **k: module(inputs)
  torch.utils.data.DataLoader = lambda *a, **k: batches
  steps, batch, size, _, channels = batches.array.shape
  per_epoch = args.steps_per_epoch
  # Their loop saves its images and checkpoints in the working folder; it
  # lists image files in --dataroot (unused: batches come from the file).
  roots = os.path.join(args.out, 'dataroot')
  os.makedirs(roots, exist_ok=True)
  _write_first_batch(batches, roots)
  sys.argv = [
      'main.py', f'--channels={args.channels}', f'--hdim={args.hdim}',
      f'--output_height={size}', f'--batchSize={batch}',
      f'--m_plus={args.m_plus}', f'--weight_neg={args.weight_neg}',
      f'--weight_rec={args.weight_rec}', f'--weight_kl={args.weight_kl}',
      f'--lr_e={args.lr}', f'--lr_g={args.lr}',
      f'--num_vae={1 + args.num_vae_steps // per_epoch}',
      f'--nEpochs={steps // per_epoch}', f'--manualSeed={args.seed}',
      f'--dataroot={roots}', f'--outf={os.path.join(args.out, "images")}',
      '--workers=0', '--test_iter=1000']
  main = load_module(args.checkout, 'introvae', 'introvae_main')
  main._CHANNELS = channels  # pylint: disable=protected-access
  main.main()
  return main.model.state_dict()


def _write_first_batch(batches: Batches, folder: str):
  from PIL import Image  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  first = np.asarray(batches.array[0])
  for i, image in enumerate(first):
    pixels = np.round(image * 255).astype(np.uint8)
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    Image.fromarray(pixels).save(os.path.join(folder, f'{i:03d}.png'))


def run_soft_introvae(args, batches: Batches) -> dict:
  """taldatech's train_soft_intro_vae(): `num_vae` epochs of VAE first."""
  module = load_module(args.checkout, 'soft_introvae', 'soft_intro_vae_train')
  steps, batch, size, _, channels = batches.array.shape
  module._PROJECT_DIGITS = (  # pylint: disable=protected-access
      size, [int(c) for c in args.channels.split(',')], channels, None)
  module.DataLoader = lambda *a, **k: batches
  per_epoch = args.steps_per_epoch
  module.train_soft_intro_vae(
      dataset='project_digits', z_dim=args.hdim, lr_e=args.lr, lr_d=args.lr,
      batch_size=batch, num_workers=0,
      num_epochs=steps // per_epoch, num_vae=args.num_vae_steps // per_epoch,
      save_interval=10**9, recon_loss_type='mse', beta_kl=args.beta_kl,
      beta_rec=args.beta_rec, beta_neg=args.beta_neg, test_iter=1000,
      seed=args.seed, device=torch.device('cpu'), gamma_r=args.gamma_r,
      with_fid=False)
  saved = glob.glob(os.path.join('saves', '*.pth'))
  if len(saved) != 1:
    raise RuntimeError(f'expected their one final checkpoint, found {saved}')
  return torch.load(saved[0], weights_only=True)['model']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--objective', choices=sorted(ENTRY), required=True)
  parser.add_argument('--checkout', required=True)
  parser.add_argument('--batches', required=True,
                      help='float32 [steps, batch, H, W, C] in [0, 1] (.npy)')
  parser.add_argument('--out', required=True)
  parser.add_argument('--seed', type=int, required=True)
  parser.add_argument('--num_vae_steps', type=int, required=True)
  parser.add_argument('--steps_per_epoch', type=int, required=True)
  parser.add_argument('--channels', required=True, help='e.g. "16,32,64"')
  parser.add_argument('--hdim', type=int, required=True)
  parser.add_argument('--lr', type=float, default=2e-4)
  parser.add_argument('--m_plus', type=float, default=25.0)
  parser.add_argument('--weight_neg', type=float, default=0.5)
  parser.add_argument('--weight_rec', type=float, default=1.0)
  parser.add_argument('--weight_kl', type=float, default=1.0)
  parser.add_argument('--beta_kl', type=float, default=1.0)
  parser.add_argument('--beta_rec', type=float, default=1.0)
  parser.add_argument('--beta_neg', type=float, default=256.0)
  parser.add_argument('--gamma_r', type=float, default=1e-8)
  parser.add_argument('--threads', type=int, default=1)
  args = parser.parse_args()
  batches = Batches(args.batches, args.steps_per_epoch)
  for name, value in (('num_vae_steps', args.num_vae_steps),
                      ('the batch count', len(batches.array))):
    if value % args.steps_per_epoch:
      parser.error(f'{name} ({value}) must be a multiple of '
                   f'--steps_per_epoch={args.steps_per_epoch}: their loops '
                   'count the warm-up and the budget in epochs.')
  torch.set_num_threads(args.threads)
  install_shims()
  args.checkout, args.out = map(os.path.abspath, (args.checkout, args.out))
  os.makedirs(args.out, exist_ok=True)
  os.chdir(args.out)  # their loops write images and checkpoints here
  start = time.time()
  run = run_introvae if args.objective == 'introvae' else run_soft_introvae
  state_dict = run(args, batches)
  seconds = time.time() - start
  torch.save({k: v.detach().cpu() for k, v in state_dict.items()},
             os.path.join(args.out, 'trained.pth'))
  # Their IntroVAE loop needs every shim; their Soft-IntroVAE loop none.
  used = list(SHIMS) if args.objective == 'introvae' else []
  with open(os.path.join(args.out, 'trained.json'), 'w') as f:
    json.dump(dict(seconds=round(seconds, 1), torch=torch.__version__,
                   threads=args.threads, shims=used), f)


if __name__ == '__main__':
  main()
