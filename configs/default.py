"""Base configuration: every field a run reads, with its default.

  python main.py --config=configs/default.py --workdir=/tmp/conadv_default

ConAdv (τ = 1), a depth-8 SmallResNet on Fashion-MNIST, 5 epochs of SGD. Expected: finishes and
writes results.json; accuracy and time not measured (configs/fashion_mnist.py is the measured
Fashion-MNIST recipe). Other config files start from `get_config()` here and override what
differs. Field names are a contract that researchers sweep over (`--config.staleness=2`); rename
none of them. conadv_jax/run/config_validation.py checks every field before anything runs.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the base config; see the module docstring."""
  config = ml_collections.ConfigDict()

  # Data. `data_dir` is the TFDS data dir (None: TFDS's default). For fashion_mnist it may also be
  # a folder holding the four original IDX .gz files.
  config.dataset = "fashion_mnist"  # fashion_mnist | cifar10 | imagenet2012 | synthetic
  config.data_dir = ml_collections.config_dict.placeholder(str)  # None until set.
  config.image_size = 0  # 0: the dataset's native size (28 for fashion_mnist, 32 for cifar10).
  # Hold the whole train split in every process's RAM and permute all of it every epoch, which
  # also makes batch t the same examples for any process count. Small datasets (fashion_mnist,
  # cifar10) always are held; for ImageNet it means ~150 GB of JPEGs per process, so by default
  # each process reads its own slice of the files (order.data_order_key).
  config.cache = False
  config.shuffle_buffer_size = 16_384  # Shuffle window of those file slices.
  # Train-time augmentation: Inception crop + flip (ImageNet), pad-and-crop + flip (small images).
  config.augment = True
  # Second view of every train example (batch["aug_image"], for the "aug" BN branch): an
  # independent crop + flip, then AutoAugment's ImageNet policy "v0" or RandAugment(N, M).
  config.aug_branch = "none"  # none | autoaugment | randaugment
  config.randaugment_num_layers = 2  # N: ops per image.
  config.randaugment_magnitude = 9.0  # M: in [0, 10].
  config.eval_batch_size = 1_000  # Global; the last batch is padded and masked.
  # synthetic only: how many examples and classes (image_size 0 means 32).
  config.synthetic_num_examples = 4_096  # Train split; the eval split has a quarter as many.
  config.synthetic_num_classes = 10

  # Model. `model` is a ResNet name (ResNet18 ... ResNet200), SmallResNet (28x28 / 32x32) or MLP.
  config.model = "SmallResNet"
  config.small_resnet_depth = 8  # 6n+2 layers: 8, 14, 20, 26, 32, 44, 56, 110.
  config.small_resnet_width = 16  # Channels of the first stage; doubled per stage.
  config.mlp_widths = (256, 256)  # MLP only: hidden widths, each Dense -> BN -> ReLU.
  config.dtype = "float32"  # Compute dtype: float32 | bfloat16. Parameters stay float32.
  config.bn_group_size = 0  # Examples per BN statistics group; 0 = whole per-device micro-batch.
  config.adv_bn = "separate"  # separate | shared: BN of the adversarial branch.
  # flax | reference: initialisation and strided-conv padding (conadv_jax/method/models.py docstring);
  # "reference" is the paper's code (tensorflow/tpu ResNet), whose LARS learning rates assume it.
  config.model_init = "flax"

  # Method. vanilla: clean gradient; disadv: attack(θ_t, x_t) then gradient (two sequential
  # passes); conadv: Algorithm 1 with `staleness` τ >= 1 (τ = 0 would be disadv).
  config.method = "conadv"
  config.staleness = 1
  config.clean_weight = 1.0
  config.adv_weight = 1.0
  config.label_smoothing = 0.0
  # sum: the branch losses (clean, adversarial, augmented) weighted and added, as Algorithm 1
  # writes it; mean: that sum divided by the number of branches, as the reference code's one
  # concatenated batch does (its LR table was tuned for it; see docs/optimizers.md).
  config.loss_weighting = "sum"
  # Where ConAdv's two tasks run. shared: every device runs tasks A and B on its slice of the
  # batch, one after the other; split: half the devices run task A and the other half task B at
  # the same time (needs conadv and an even number of devices). Same numbers either way, and a
  # run may resume in the other layout; docs/performance.md says when split is faster.
  config.task_layout = "shared"

  # Attack: L∞ PGD on the 0-255 pixel scale (reference defaults: one targeted step, ε = step = 9).
  config.attack = ml_collections.ConfigDict()
  config.attack.epsilon = 9.0
  config.attack.step_size = 9.0
  config.attack.num_steps = 1
  config.attack.random_start_prob = 0.8
  config.attack.targeted = True
  config.attack.random_start = "per_example"  # per_example | per_batch (the reference: one coin).

  # Optimisation. `batch_size` is the global number of clean examples per step. `learning_rate`
  # is the peak learning rate as given (no implicit scaling with the batch size).
  config.batch_size = 256
  # Micro-batches per step: the batch is processed in this many slices one after another, with
  # one update; BN statistics are per micro-batch (per bn_group_size group within it).
  config.grad_accum_steps = 1
  config.num_epochs = 5.0
  config.num_train_steps = -1  # -1: derive from num_epochs; a positive value overrides it.
  config.optimizer = "sgd"  # lars | sgd | lamb
  config.learning_rate = 0.1
  config.warmup_epochs = 1.0  # Clamped (with a warning) to the run when the run is shorter.
  config.lr_schedule = "cosine"  # cosine | polynomial
  config.lr_decay_power = 2.0  # polynomial only.
  config.end_learning_rate = 0.0
  config.weight_decay = 5e-4
  config.momentum = 0.9
  config.nesterov = True  # sgd only.
  config.lars_trust_coefficient = 0.001
  config.lars_eps = 0.0

  # Loop.
  config.seed = 0
  config.log_every_steps = 50
  config.eval_every_steps = -1  # -1: once per epoch.
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.eval_adversarial = True  # Also report accuracy under the training attack.
  # Final eval only: top-1 under untargeted L∞ PGD (random start, step 2.5·ε/steps, main BN),
  # results.json's eval.robust_top1. ε on the 0-255 scale: 8 is the usual 8/255, just under the
  # training attack's 9. 0 steps: off. Each step costs one forward/backward over the eval split.
  config.eval_pgd_steps = 10
  config.eval_pgd_epsilon = 8.0
  # Final parameters only: the top eigenvalue of the training loss's Hessian (BN in inference
  # mode) by power iteration on the first `sharpness_num_examples` un-augmented training
  # examples; results.json's sharpness.top_hessian_eigenvalue. 0: off (it costs about
  # 2 x iterations forward/backward passes over the subset); studies use >= 2,048.
  config.sharpness_num_examples = 0
  config.sharpness_iterations = 20
  config.prefetch_to_device = 2
  # Largest adversarial FIFO per device, in GiB; 0: half the device's memory (unchecked on CPU).
  config.fifo_memory_limit_gib = 0.0
  config.profile_steps = 0  # > 0: trace this many steps for TensorBoard's profiler.
  return config.lock()  # A misspelled field is an error, not a new field.
