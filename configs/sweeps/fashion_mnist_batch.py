"""The study of docs/study.md: 4 batch sizes x 4 methods x 3 seeds on Fashion-MNIST.

  python scripts/sweep.py --sweep=configs/sweeps/fashion_mnist_batch.py --root=/work/study_root \
      --parallel=2

Every run is configs/fashion_mnist_study.py:METHOD_BATCH with only the seed overridden. Expected:
docs/study.md's results table (e.g. vanilla 90.22 ± 0.06 % test top-1 at 256, 86.67 ± 0.69 at
16K). Time: the 48 runs' wall times add up to at least 2.4 hours, two at a time on a shared
2-core CPU (docs/study.md, Results). Ordered seed by seed, so a sweep stopped part-way has whole
grids for the first seeds.
"""
from configs import fashion_mnist_study

METHODS = ("vanilla", "disadv", "conadv", "conadv2")
SEEDS = (0, 1, 2)


def get_sweep() -> list[tuple[str, dict]]:
  return [(f"configs/fashion_mnist_study.py:{method}_{batch}", {"seed": seed})
          for seed in SEEDS
          for batch in fashion_mnist_study.BATCH_SIZES
          for method in METHODS]
