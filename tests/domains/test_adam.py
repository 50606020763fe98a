"""BoundFlow's Adam takes the same steps as ``torch.optim.Adam(fused=True)`` with
``ExponentialLR``, and the first alpha-CROWN bound of a process does not import
``torch._dynamo`` (what ``torch.optim``'s constructor costs: 1.1-1.7 s)."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from boundflow.domains.adam import Adam


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_steps_as_torch_fused_adam(dtype):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, generator=gen, dtype=dtype), torch.randn(5, generator=gen, dtype=dtype),
            torch.randn(2, 2, generator=gen, dtype=dtype)]
    ours = [t.clone().requires_grad_(True) for t in init]
    ref = [t.clone().requires_grad_(True) for t in init]
    opt = Adam([(ours[:2], 0.5), (ours[2:], 0.1)])
    topt = torch.optim.Adam([{"params": ref[:2], "lr": 0.5}, {"params": ref[2:], "lr": 0.1}],
                            fused=True)
    sched = torch.optim.lr_scheduler.ExponentialLR(topt, 0.9)
    target = torch.randn(4, 3, generator=gen, dtype=dtype)
    for step in range(6):
        for params, o in ((ours, opt), (ref, topt)):
            o.zero_grad()
            # the second parameter gets no gradient on odd steps: it must not move then
            loss = ((params[0] - target) ** 3).abs().sum() + (params[2] ** 2).sum()
            if step % 2 == 0:
                loss = loss + params[1].sin().sum()
            loss.backward()
            o.step()
        opt.decay(0.9)
        sched.step()
        for a, b in zip(ours, ref):
            assert torch.equal(a, b), step
    assert not torch.equal(ours[1], init[1]) and not torch.equal(ours[0], init[0])


def test_a_parameter_without_gradient_stays():
    p = torch.ones(3, requires_grad=True)
    q = torch.ones(2, requires_grad=True)
    opt = Adam([([p, q], 0.5)])
    (p * 2).sum().backward()
    opt.step()
    assert torch.equal(q, torch.ones(2)) and bool((p < 1).all())


def _onnx_mlp(path):
    """A 3-8-8-2 ReLU net as an ONNX file (an ONNX model loads without torch.export,
    which imports torch._dynamo itself)."""
    rng = np.random.default_rng(0)
    shapes = [(8, 3), (8, 8), (2, 8)]
    inits, nodes, prev = [], [], "x"
    for i, (o, n) in enumerate(shapes):
        inits += [numpy_helper.from_array(rng.normal(size=(o, n)).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array(rng.normal(size=o).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"b{i}"], [f"h{i}"], transB=1))
        prev = f"h{i}"
        if i < len(shapes) - 1:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


@pytest.mark.parametrize("method", ["alpha-crown", "beta"])
def test_the_first_optimised_bound_does_not_import_dynamo(tmp_path, method):
    _onnx_mlp(tmp_path / "m.onnx")
    if method == "alpha-crown":
        call = ("r = bf.compute_bounds(g, bf.InputSpec.linf(np.zeros((2, 3), np.float32), 0.5),"
                " method='alpha-crown')\n"
                "assert np.isfinite(r.lower).all()\n")
    else:   # beta-CROWN's multipliers under a split state
        call = ("import torch\n"
                "import boundflow.domains.beta as B\n"
                "from boundflow.bab.bounder import _verifier\n"
                "from boundflow.bab.relu_split import relu_inputs\n"
                "from boundflow.ir.split import ReluSplit\n"
                "from boundflow.ir.spec import InputSpec, LinearSpec\n"
                "made = []\n"
                "class Counted(B.Adam):\n"
                "    def __init__(self, *a):\n"
                "        made.append(1)\n"
                "        super().__init__(*a)\n"
                "B.Adam = Counted\n"
                "v = _verifier(g, 4, 1, 'crown', 'torch', None, 'time@width')\n"
                "node = relu_inputs(g)[0]\n"
                "signs = torch.zeros(4, 8, dtype=torch.int8); signs[:, :3] = 1\n"
                "box = InputSpec.box(-np.ones((4, 3), np.float32), np.ones((4, 3), np.float32))\n"
                "C = LinearSpec(np.tile(np.array([[[1.0, -1.0]]], np.float32), (4, 1, 1)))\n"
                "out = v._executor.run(box, C, upper=False,"
                " split=ReluSplit({node: signs}, beta_iterations=3))\n"
                "assert made and np.isfinite(out.lower.numpy()).all(), made\n")
    code = ("import sys, numpy as np, boundflow as bf\n"
            "from boundflow.frontend.onnx import load_onnx\n"
            f"g = load_onnx({str(tmp_path / 'm.onnx')!r})\n" + call +
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
