"""Train the digits examples of max pooling, sigmoid and tanh (seconds on a CPU) and save each
as a ``torch.export`` program, an ONNX model and a VNN-LIB robustness property:

    python -m boundflow.examples.generate      # writes boundflow/examples/data/digits_*_*

Needs scikit-learn (``pip install -e '.[train]'``) for its bundled 8x8 digits. The split and
the training loop are those of ``tools/train_examples.py`` (which trains ``digits_mlp`` and
``digits_cnn``), so ``data/digits_test.npz`` holds held-out digits for these models too.
Seeded: a rerun writes the same weights on the same torch version and machine.
"""

from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from boundflow.examples import DATA, digits_samples, more_digits_architectures

EPOCHS = 40
PROPERTY_EPS = {"digits_maxpool_cnn": 0.02, "digits_sigmoid_mlp": 0.02, "digits_tanh_mlp": 0.02}
OPSET = 17


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def vnnlib_property(x: np.ndarray, label: int, eps: float, n_out: int, title: str) -> str:
    """The VNN-COMP robustness property: every input within ``eps`` of ``x`` (clipped to
    [0, 1]) keeps ``label`` the top class. The file asserts the unsafe region: some other
    output at least as large as the label's."""
    flat = x.reshape(-1).astype(np.float64)
    lo, hi = np.clip(flat - eps, 0.0, 1.0), np.clip(flat + eps, 0.0, 1.0)
    lines = [f"; {title}", ""]
    lines += [f"(declare-const X_{i} Real)" for i in range(flat.size)]
    lines += [""] + [f"(declare-const Y_{j} Real)" for j in range(n_out)] + [""]
    for i, (low, high) in enumerate(zip(lo.tolist(), hi.tolist())):
        lines += [f"(assert (>= X_{i} {low!r}))", f"(assert (<= X_{i} {high!r}))"]
    others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(n_out) if j != label)
    lines += ["", f"(assert (or {others}))", ""]
    return "\n".join(lines)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    path.write_bytes(buf.getvalue())


def main() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args()

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]       # [n, 1, 8, 8] in [0, 1]
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.2, random_state=0)
    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    samples, labels = digits_samples()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, model in more_digits_architectures(float(x_tr.mean()), float(x_tr.std())).items():
        train(model, xt, yt, args.epochs)
        with torch.no_grad():
            acc = (model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean()
            right = model(torch.from_numpy(samples)).argmax(1).numpy() == labels
        batch = {0: torch.export.Dim("batch", min=1, max=1 << 16)}
        program = torch.export.export(model, (torch.from_numpy(x_te[:2]),),
                                      dynamic_shapes=(batch,))
        torch.export.save(program, args.out / f"{name}.pt2")
        export_onnx(model, torch.from_numpy(x_te[:1]), args.out / f"{name}.onnx")
        i = int(np.argmax(right))                   # the first bundled digit it gets right
        eps = PROPERTY_EPS[name]
        title = (f"{name}: bundled test digit {i} (label {labels[i]}) keeps its class under "
                 f"L-inf eps {eps}, clipped to [0, 1]")
        text = vnnlib_property(samples[i], int(labels[i]), eps, 10, title)
        (args.out / f"{name}.vnnlib").write_text(text)
        print(f"{name}: test accuracy {acc:.3f} ({len(y_te)} digits) -> {name}.pt2, "
              f"{name}.onnx, {name}.vnnlib (digit {i}, eps {eps})")


if __name__ == "__main__":
    main()
