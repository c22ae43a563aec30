"""ResNet-50 on ImageNet (ILSVRC-2012), the paper's large-scale setting.

lr 0.1 x batch / 256 with a 5-epoch linear warmup then cosine, wd 1e-4,
label smoothing 0.1, 90/180/270 epochs (``--config.num_epochs=180``), the
same DST settings as CIFAR. The stem convolution stays dense, as in RigL.
Needs the tfds ``imagenet2012`` array_record build (see input_pipeline).
"""

from experiments.configs import default


def get_config():
  """RigL 90% + SparseOpt, batch 1024, 90 epochs, bfloat16 compute."""
  config = default.get_config()
  config.model = "resnet50"
  config.dataset = "imagenet2012"
  config.image_size = 224
  config.dtype = "bfloat16"
  config.num_data_threads = 16
  config.method = "rigl"
  config.sparsity = 0.90
  config.distribution = "erk"
  config.dense_paths = ("conv_init",)
  config.optimizer = "sparseopt"
  config.batch_size = 1024
  # A reference, so --config.batch_size=... rescales the learning rate too;
  # the float default must go first (a field keeps its type).
  del config.learning_rate
  config.learning_rate = config.get_ref("batch_size") * (0.1 / 256)
  config.warmup_epochs = 5.0
  config.weight_decay = 1e-4
  config.label_smoothing = 0.1
  config.num_epochs = 90.0
  config.eval_batch_size = 1000
  config.log_every = 100
  config.eval_every = 1251 * 5  # 1251 steps an epoch at batch 1024.
  config.checkpoint_every = 1251
  return config
