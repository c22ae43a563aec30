"""Default hyperparameters: every knob `experiments.train` reads, with its meaning.

The other configs in this folder start from `get_config()` here and change
what their setting needs. Override any field on the command line:
``--config.sparsity=0.9 --config.optimizer=sgd``. Each field's type and
accepted values are in the table `fields.FIELDS`, checked before a run
starts; a new field goes in both.
"""

import ml_collections

# Fields that may change when a run resumes: they do not change the numbers.
RESUMABLE_FIELDS = frozenset(
    {
        "data_dir",
        "num_data_threads",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "progress_bar",
        "turning_diagnostics",
        "fan_in_histogram",
        "sigma_diagnostics",
        "tensorboard",
        # A layout: a checkpoint restores into either (orbax re-shards);
        # on several devices only float rounding (summation order) differs.
        "sharding",
    }
)


def get_config() -> ml_collections.ConfigDict:
  """The defaults: small BN ResNet, Fashion-MNIST, RigL at 95%, SparseOpt."""
  config = ml_collections.ConfigDict()

  # Model and data.
  config.model = "fmnist_resnet"  # A key of experiments.models.MODELS.
  # First-stage filters (ResNets) or hidden units (MLP); 0 = preset default.
  config.width = 0
  config.dataset = "fashion_mnist"  # A key of input_pipeline.DATASETS.
  config.data_dir = ""  # "" = Debian's idx files / the default tfds data_dir.
  config.image_size = 0  # Variable-size datasets only (ImageNet); 0 = default.
  config.augment = "none"  # "crop_flip" (on device) or "none".
  config.dtype = "float32"  # Computation dtype; "bfloat16" on TPU/GPU.
  config.num_data_threads = 2

  # Sparsity. method: dense | static | set | rigl | gmp (gradual magnitude
  # pruning from dense, Zhu & Gupta: `sparsity` is the final sparsity).
  config.method = "rigl"
  config.sparsity = 0.95
  config.distribution = "erk"  # "erk" or "uniform".
  # Regexes of kernel paths kept dense (e.g. ("conv_init",) for the stem).
  config.dense_paths = ()
  config.update_every = 100  # Delta T: steps between mask updates.
  config.drop_fraction = 0.3  # Initial fraction of weights dropped per update.
  config.drop_schedule = "cosine"  # "cosine" or "constant".
  config.end_fraction = 0.75  # Mask updates stop at this fraction of training.
  config.grow_with = "raw"  # RigL grows by |raw| or |corrected| gradient.
  # Sparse kernels' initialization: "masked_dense" (the model's dense init,
  # then masked: neuron norms shrink like sqrt(1 - s_i)) or "fan_in"
  # (sparseopt.sparse_init: variance 2 / active fan-in, equal neuron norms).
  config.init = "masked_dense"
  # Mask structure: "unstructured", "constant_fan_in" (every neuron of a
  # layer keeps the same number of inputs, SRigL) or "n:m" such as "2:4" (at
  # most n of every m consecutive inputs; needs sparsity = 1 - n/m).
  config.structure = "unstructured"
  # method="gmp": pruning runs from gmp_start_fraction to gmp_end_fraction
  # of training, every update_every steps, on Zhu & Gupta's cubic schedule.
  config.gmp_start_fraction = 0.1
  config.gmp_end_fraction = 0.75
  config.gmp_schedule = "cubic"

  # Optimizer. sgd | sparseopt | adam | sparseopt+adam ("adam" is AdamW:
  # decoupled weight decay, optax.adamw).
  config.optimizer = "sparseopt"
  # Layers the SparseOpt correction applies to: "all" masked kernels, or
  # "bn_only" = all but the classifier `head`, which no BatchNorm follows.
  config.correct_filter = "all"
  # SparseOpt's factor: "fan_in" (the paper's sqrt(1-s_i)/sqrt(1-s_avg)),
  # "norm" (measured from the live weight norms) or "batch_stats" (the
  # std sigma_i of the BatchNorm that normalizes each kernel's output; the
  # classifier head, which no BatchNorm follows, is left alone).
  config.correction = "fan_in"
  # The unit of SparseOpt's factor: "neuron" (the paper: each output unit;
  # q/k/v attention kernels' heads * head_dim neurons) or "group" (the
  # reduction group of the normalizer after the kernel: a neuron under
  # BatchNorm, a head under QK-norm, none under LayerNorm/RMSNorm or when
  # no normalizer follows; see optimizers.group_axes).
  config.correction_unit = "neuron"
  # correction="batch_stats" only: whose variances give sigma_i: "batch"
  # (this step's batch, which BatchNorm divides by in this very step) or
  # "running" (the running averages, as the step started).
  config.bn_stats = "batch"
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = False
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  config.weight_decay = 5e-4
  # Renormalization ablation: rescale the (corrected) loss gradient to unit
  # norm before weight decay and the optimizer, over all leaves ("global",
  # optax.normalize_by_update_norm) or per leaf ("layer"); "none" = off.
  config.renormalize = "none"
  # HAM (Jacobs et al., ICLR 2026): a multiplicative step on every kernel
  # after the optimizer's, exp(-lr * (ham_alpha * sign(w) * g + ham_beta)),
  # with g the gradient HAM receives (SparseOpt's corrected one, when on).
  config.ham = False
  config.ham_alpha = 200.0
  config.ham_beta = 1e-3
  # Dense control: multiply the loss gradients of a fixed random
  # grad_scale_fraction of each BN-followed kernel's neurons by grad_scale
  # (1.0 = off); it sits where SparseOpt does, before weight decay.
  config.grad_scale = 1.0
  config.grad_scale_fraction = 0.5
  config.label_smoothing = 0.0
  config.schedule = "cosine"  # "cosine", "step" or "constant", after warmup.
  config.warmup_epochs = 0.0
  config.step_boundaries = (0.5, 0.75)  # "step": fractions of training ...
  config.step_decay = 0.1  # ... at which the rate is multiplied by this.

  # Budget.
  config.batch_size = 128  # Global, over all devices and hosts.
  config.eval_batch_size = 1000
  config.num_epochs = 3.0
  config.num_train_steps = -1  # > 0 overrides num_epochs.
  config.seed = 0
  # Layout over the devices (one mesh axis "data", which shards the batch):
  # "replicated" params and optimizer state, or "fsdp": each kernel, its
  # masks and its optimizer moments split on their largest axis divisible
  # by the device count (others replicated), mask updates selecting per
  # shard (sparseopt.dynamic_sparse(shardings=...)).
  config.sharding = "replicated"

  # Bookkeeping.
  config.log_every = 50  # Steps between fetching metrics to the host.
  # Log per-layer turning rates (angle, imbalance exponent, norm) at log
  # steps and the norm-vs-factor jump at mask updates (computed in the train
  # step under lax.cond, so other steps do not pay for it).
  config.turning_diagnostics = True
  # Log each sparse layer's histogram of active fan-in per neuron
  # (``L/fan_in/<bin>``, power-of-two bins) at log steps.
  config.fan_in_histogram = True
  # Log, for each kernel a BatchNorm follows, how well sqrt(1 - s_i) and
  # ||w_i|| predict BatchNorm's measured per-neuron std sigma_i (this step's
  # batch): ``sigma/L/...`` correlations across live neurons and the slope
  # of log sigma_i on log(1 - s_i) (the paper predicts 0.5). Log steps only.
  config.sigma_diagnostics = False
  config.eval_every = 200  # Steps between test evaluations (and at the end).
  # Before an evaluation that follows a mask update, re-estimate BatchNorm's
  # running statistics over this many training batches (an equal average,
  # from scratch), for that evaluation only: training is unchanged. 0 = off.
  config.recalibrate_batches = 0
  config.checkpoint_every = 1000  # Steps between checkpoints (and at the end).
  config.keep_checkpoints = 3
  config.progress_bar = True
  # Also write every logged record to TensorBoard event files in
  # <workdir>/tensorboard (tensorboardX; TensorFlow is not needed).
  config.tensorboard = True
  return config
