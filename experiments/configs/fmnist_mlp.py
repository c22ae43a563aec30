"""The paper's 2-layer BatchNorm MLP on Fashion-MNIST (fast on CPU)."""

from experiments.configs import default


def get_config():
  """RigL at 95% with SparseOpt on the 784-256-10 BN MLP."""
  config = default.get_config()
  config.model = "fmnist_mlp"
  config.dataset = "fashion_mnist"
  config.learning_rate = 0.05
  config.num_epochs = 10.0
  return config
