"""A small pre-LN ViT on Fashion-MNIST (7x7 patches, 16 tokens; CPU-sized).

4 blocks, d_model 64, 4 heads of 16, MLP 128, mean pooling
(``experiments.models.ViT``; ``--config.model=fmnist_vit_qk`` adds QK-norm).
AdamW with decoupled weight decay and a linear warmup, the usual recipe for
transformers. RigL's masks cover the Dense and attention kernels (``query``,
``key``, ``value``, ``out``, ``mlp_up``, ``mlp_down``); biases, norms and
the position embedding are never sparse. The patch embedding and the
``head`` stay dense too: the embedding's 49 x 64 kernel is the only path
from the pixels, and both are about 4% of the weights (3.1k + 0.6k of
about 0.14M), so they buy little sparsity for a large risk, as the stem and
classifier of the sparse-training literature's ResNets.
"""

from experiments.configs import default


def get_config():
  """RigL at 95% with SparseOpt + AdamW, lr 1e-3, wd 0.05, 3 epochs."""
  config = default.get_config()
  config.model = "fmnist_vit"
  config.dataset = "fashion_mnist"
  config.dense_paths = ("^patch_embed/", "^head/")
  config.optimizer = "sparseopt+adam"
  config.learning_rate = 1e-3
  config.weight_decay = 0.05
  config.warmup_epochs = 0.5
  config.num_epochs = 3.0
  return config
