"""The learning-rate tuning of docs/study.md: vanilla only, seed 0, a grid per batch size.

  python scripts/sweep.py --sweep=configs/sweeps/fashion_mnist_lr_tuning.py \
      --root=/work/study_tuning --parallel=2

Expected: the best peak LR per batch is configs/fashion_mnist_study.py's LR_TABLE (256: 4, 1K: 8,
4K: 32, 16K: 16; every run in docs/study.md). Time: not recorded (24 vanilla runs of 15 epochs).
The grid is geometric (factors of 2), shifted up with the batch, where fewer steps need larger
ones. No sharpness or PGD: only test top-1 decides (docs/study.md says what that favours).
"""
from configs import fashion_mnist_study

GRID = {256: (0.5, 1.0, 2.0, 4.0, 8.0, 16.0), 1_024: (1.0, 2.0, 4.0, 8.0, 16.0, 32.0),
        4_096: (2.0, 4.0, 8.0, 16.0, 32.0, 64.0), 16_384: (4.0, 8.0, 16.0, 32.0, 64.0, 128.0)}


def get_sweep() -> list[tuple[str, dict]]:
  runs = []
  for name, batch in fashion_mnist_study.BATCH_SIZES.items():
    for lr in GRID[batch]:
      runs.append((f"configs/fashion_mnist_study.py:vanilla_{name}",
                   {"learning_rate": lr, "seed": 0, "eval_pgd_steps": 0,
                    "sharpness_num_examples": 0}))
  return runs
