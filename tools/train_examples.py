"""Train the bundled digits examples (seconds on a CPU) and save them as torch.export programs.

    python tools/train_examples.py          # writes boundflow/examples/data/*

Needs scikit-learn (``pip install -e '.[train]'``) for its bundled 8x8 digits data set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from boundflow.examples import DATA, digits_architectures
from boundflow.examples.generate import train  # the one training loop of the examples


def main() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]       # [n, 1, 8, 8] in [0, 1]
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.2, random_state=0)
    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, model in digits_architectures(float(x_tr.mean()), float(x_tr.std())).items():
        train(model, xt, yt, args.epochs)
        with torch.no_grad():
            acc = (model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean()
        batch = {0: torch.export.Dim("batch", min=1, max=1 << 16)}
        program = torch.export.export(model, (torch.from_numpy(x_te[:2]),), dynamic_shapes=(batch,))
        torch.export.save(program, args.out / f"{name}.pt2")
        print(f"{name}: test accuracy {acc:.3f} -> {args.out / (name + '.pt2')}")
    np.savez_compressed(args.out / "digits_test.npz", x=x_te[:64], labels=y_te[:64])
    np.save(args.out / "digits_x.npy", x_te[:8])
    print(f"64 test digits -> {args.out / 'digits_test.npz'}; 8 for the demo -> digits_x.npy")


if __name__ == "__main__":
    main()
