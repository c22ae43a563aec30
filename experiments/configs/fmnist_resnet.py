"""Small BN ResNet (ResNet-8, 8/16/32 filters) on Fashion-MNIST.

Sized for CPU: the quickstart and Reproduction B use it. Same DST settings as
the paper's CIFAR runs (ERK, Delta T = 100, drop 0.3 cosine, end at 75%).
"""

from experiments.configs import default


def get_config():
  """RigL at 95% with SparseOpt, SGD lr 0.05, 3 epochs."""
  config = default.get_config()
  config.model = "fmnist_resnet"
  config.dataset = "fashion_mnist"
  config.learning_rate = 0.05
  config.num_epochs = 3.0
  return config
