"""ResNet-20 on CIFAR-100, the paper's main setting.

SGD momentum 0.9, lr 0.1 cosine, batch 128, wd 5e-4, pad-4 crop + flip; RigL
or SET at 0.90/0.95/0.97 with ERK, Delta T = 100, initial drop fraction 0.3
cosine-decayed, mask updates ending at 75% of training. The paper trains for
100, 200, 300 or 500 epochs: ``--config.num_epochs=200``.
"""

from experiments.configs import default


def get_config():
  """RigL 90% + SparseOpt, 100 epochs."""
  config = default.get_config()
  config.model = "resnet20"
  config.dataset = "cifar100"
  config.augment = "crop_flip"
  config.method = "rigl"
  config.sparsity = 0.90
  config.distribution = "erk"
  config.optimizer = "sparseopt"
  config.learning_rate = 0.1
  config.weight_decay = 5e-4
  config.batch_size = 128
  config.num_epochs = 100.0
  config.log_every = 100
  config.eval_every = 391 * 5  # Every 5 epochs (391 steps an epoch).
  config.checkpoint_every = 391 * 5
  return config
