"""Natural training on MNIST: time and test accuracy of the zoo models through the one training loop.

    python benchmarks/bench_train.py [--models cnn-small lenet5] [--epochs 3]

Prints one line per model (epochs, seconds, test accuracy on the full 10k test split) and the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from certattr.data import load_dataset
from certattr.models import build_model
from certattr.train import accuracy, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["cnn-small"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x_train, y_train = load_dataset("mnist", "train")
    x_test, y_test = load_dataset("mnist", "test")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__},"
          f" {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    print("model\tepochs\tseconds\ttest_accuracy")
    for name in args.models:
        torch.manual_seed(args.seed)
        model = build_model(name)
        summary = fit(model, (x_train, y_train), epochs=args.epochs, batch_size=args.batch_size,
                      seed=args.seed, progress=False)
        print(f"{name}\t{args.epochs}\t{summary['seconds']:.1f}\t{accuracy(model, x_test, y_test):.4f}", flush=True)


if __name__ == "__main__":
    main()
