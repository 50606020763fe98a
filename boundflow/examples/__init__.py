"""Bundled example models.

* ``digits_mlp`` / ``digits_cnn``: small classifiers trained in seconds on scikit-learn's
  8x8 digits (``tools/train_examples.py``), shipped as ``torch.export`` programs with 64 test
  images. Inputs are ``[batch, 1, 8, 8]`` in [0, 1]; the input normalisation is inside the model.
* ``random_mlp`` / ``random_deep_mlp`` / ``random_cnn`` / ``random_residual`` / ``random_nhwc``:
  fixed-seed random models that cover the
  rest of the operator set (BatchNorm, average pooling, grouped / dilated / strided convolution,
  residual additions, concatenation, permutes and reshapes).
* ``digits_maxpool_cnn`` / ``digits_sigmoid_mlp`` / ``digits_tanh_mlp`` (:data:`MORE_EXAMPLES`):
  digits classifiers with max pooling, sigmoid and tanh, trained the same way
  (``python -m boundflow.examples.generate``), each shipped as a ``torch.export`` program, an
  ONNX file and a VNN-LIB robustness property (``data/<name>.pt2|.onnx|.vnnlib``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Example:
    """A model with a batch of typical inputs (and their labels where they are known)."""

    name: str
    model: object            # a torch.nn.Module or an ir.Graph
    inputs: np.ndarray       # [batch, *in]
    labels: np.ndarray | None


def digits_samples() -> tuple[np.ndarray, np.ndarray]:
    """64 held-out digits, ``x`` of shape [64, 1, 8, 8] in [0, 1], and their labels."""
    with np.load(DATA / "digits_test.npz", allow_pickle=False) as d:
        return d["x"], d["labels"]


def digits_architectures(mean: float = 0.0, std: float = 1.0) -> dict[str, nn.Module]:
    """The untrained digits models (``tools/train_examples.py`` trains them)."""
    return {
        "digits_mlp": nn.Sequential(
            Normalize(mean, std), nn.Flatten(),
            nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)),
        "digits_cnn": nn.Sequential(
            Normalize(mean, std),
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10)),
    }


def more_digits_architectures(mean: float = 0.0, std: float = 1.0) -> dict[str, nn.Module]:
    """The untrained digits models of :data:`MORE_EXAMPLES` (``examples/generate.py`` trains
    them): max pooling, sigmoid and tanh."""
    def mlp(act: type[nn.Module]) -> nn.Module:
        return nn.Sequential(Normalize(mean, std), nn.Flatten(), nn.Linear(64, 32), act(),
                             nn.Linear(32, 32), act(), nn.Linear(32, 10))

    return {
        "digits_maxpool_cnn": nn.Sequential(
            Normalize(mean, std),
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)),
        "digits_sigmoid_mlp": mlp(nn.Sigmoid),
        "digits_tanh_mlp": mlp(nn.Tanh),
    }


def digits_module(name: str) -> nn.Module:
    """A bundled digits model as a plain ``nn.Module`` (weights from its saved program)."""
    from boundflow.frontend.pt2 import load_exported

    model = {**digits_architectures(), **more_digits_architectures()}[name]
    program = load_exported(DATA / f"{name}.pt2")
    model.load_state_dict({k: v.detach().clone() for k, v in program.state_dict.items()})
    return model.eval()


def _digits(name: str) -> Example:
    from boundflow.frontend.pt2 import load_model

    x, labels = digits_samples()
    return Example(name, load_model(DATA / f"{name}.pt2"), x, labels)


class Normalize(nn.Module):
    """``(x - mean) / std`` with constant mean and std: the usual input normalisation."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x):
        return (x - self.mean) / self.std


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn(self.conv1(x)))))


class ResidualNet(nn.Module):
    """Residual blocks, a two-branch concatenation, a permute and a reshape."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block = ResidualBlock(8)
        self.left = nn.Conv2d(8, 4, 1)
        self.right = nn.Conv2d(8, 4, 3, padding=2, dilation=2)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = self.block(torch.relu(self.stem(x)))
        h = torch.cat([self.left(h), torch.relu(self.right(h))], dim=1)
        h = self.pool(h).permute(0, 2, 3, 1)            # NHWC
        return self.head(h.reshape(h.shape[0], -1) * 0.5 - 0.1)


class ChannelsLastNet(nn.Module):
    """A channels-last (H, W, C) input permuted to NCHW, a transpose pair, two convs, then
    permuted back to (H, W, C) and flattened: the layout planner's test case."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        h = torch.relu(self.conv1(x.permute(0, 3, 1, 2)))
        h = h.transpose(2, 3).transpose(2, 3)
        h = torch.relu(self.conv2(h))
        h = h.permute(0, 2, 3, 1)
        return self.head(h.reshape(h.shape[0], -1))


def reference_architecture(name: str) -> nn.Module:
    """The fixed models of auto_LiRPA's recorded bounds (``mlp``: 784-256-256-10, ``cnn``:
    two strided 4x4 convolutions then 2048-100-10), PyTorch's default initialisation after
    ``torch.manual_seed(0)``; load the recorded weights into them to compare bounds."""
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(3, 16, 4, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(2048, 100), nn.ReLU(), nn.Linear(100, 10))
    raise ValueError(f"no reference architecture {name!r}; there are 'mlp' and 'cnn'")


def _randomise_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def _random(name: str, build: Callable[[], nn.Module], shape: tuple, seed: int) -> Example:
    torch.manual_seed(seed)
    model = build().eval()
    gen = torch.Generator().manual_seed(seed)
    _randomise_batchnorm(model, gen)
    x = torch.rand((8,) + shape, generator=gen).numpy()
    return Example(name, model, x, None)


def random_mlp(seed: int = 0) -> Example:
    build = lambda: nn.Sequential(Normalize(0.5, 0.25), nn.Flatten(), nn.Linear(20, 32),  # noqa
                                  nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    return _random("random_mlp", build, (4, 5), seed)


def random_deep_mlp(seed: int = 0) -> Example:
    """Seven hidden layers: CROWN's backward passes grow with depth, so plans differ most."""
    def build():
        layers: list[nn.Module] = [Normalize(0.5, 0.25), nn.Flatten(), nn.Linear(20, 48),
                                   nn.ReLU()]
        for _ in range(6):
            layers += [nn.Linear(48, 48), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(48, 5))
    return _random("random_deep_mlp", build, (4, 5), seed)


def random_cnn(seed: int = 0) -> Example:
    build = lambda: nn.Sequential(  # noqa: E731
        Normalize(torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1), 0.3),
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))
    return _random("random_cnn", build, (3, 16, 16), seed)


def random_residual(seed: int = 0) -> Example:
    return _random("random_residual", ResidualNet, (3, 16, 16), seed)


def random_nhwc(seed: int = 0) -> Example:
    return _random("random_nhwc", ChannelsLastNet, (12, 12, 3), seed)


EXAMPLES: dict[str, Callable[[], Example]] = {
    "digits_mlp": lambda: _digits("digits_mlp"),
    "digits_cnn": lambda: _digits("digits_cnn"),
    "random_mlp": random_mlp,
    "random_deep_mlp": random_deep_mlp,
    "random_cnn": random_cnn,
    "random_residual": random_residual,
    "random_nhwc": random_nhwc,
}


# The examples of max pooling, sigmoid and tanh. Kept apart from EXAMPLES, which the planner,
# backend and domain suites run over, until every backend takes these ops; ``load`` finds both.
MORE_EXAMPLES: dict[str, Callable[[], Example]] = {
    name: (lambda name=name: _digits(name))
    for name in ("digits_maxpool_cnn", "digits_sigmoid_mlp", "digits_tanh_mlp")
}


def load(name: str) -> Example:
    """The example called ``name``; an unknown name raises, listing the examples."""
    from boundflow.errors import BoundFlowError

    every = {**EXAMPLES, **MORE_EXAMPLES}
    if name not in every:
        raise BoundFlowError(f"no example {name!r}; the examples are {sorted(every)}")
    return every[name]()
