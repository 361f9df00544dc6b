"""Train the embedded default model and write the shipped files into lowrank_compress/examples/assets/.

    .venv/bin/python benchmarks/train_digits.py            # seed 0, the shipped files
    .venv/bin/python benchmarks/train_digits.py --out /tmp/digits --seed 1

Deterministic: the same seed gives the same weights and accuracy on the same torch build (training
runs on one thread; see ``train_digits_cnn``). Needs scikit-learn (a dev dependency) for the data.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lowrank_compress.examples import digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="fixes the split, the init and the batch order")
    parser.add_argument("--epochs", type=int, default=digits.DEFAULT_EPOCHS)
    parser.add_argument("--out", type=Path, default=digits.ASSETS_DIR, help="folder for the two safetensors files")
    args = parser.parse_args()

    start = time.perf_counter()
    model, test_accuracy = digits.train_digits_cnn(seed=args.seed, epochs=args.epochs)
    seconds = time.perf_counter() - start
    _, _, x_test, y_test = digits.load_digits_split(args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / digits.CHECKPOINT_NAME
    test_split = args.out / digits.TEST_SPLIT_NAME
    digits.save_checkpoint(model, checkpoint, test_accuracy=test_accuracy, seed=args.seed, epochs=args.epochs)
    digits.save_test_split(test_split, x_test, y_test)

    params = sum(p.numel() for p in model.parameters())
    print(f"DigitsCNN: {params:,} params, seed {args.seed}, {args.epochs} epochs, trained in {seconds:.1f} s")
    print(f"test accuracy: {test_accuracy:.4%} on {len(y_test)} held-out digits")
    for path in (checkpoint, test_split):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
