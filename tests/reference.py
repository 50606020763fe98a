"""An independent IBP written from first principles in float64 numpy, for tests only.

It shares no code with ``boundflow.domains``: affine maps use the positive/negative weight
split (``lo = W⁺·l + W⁻·u + b``) rather than the centre/radius form, and convolution is
written as a sum over kernel offsets rather than a library call.
"""

from __future__ import annotations

import numpy as np

from boundflow.ir.graph import Graph


def _pos_neg(w):
    return np.maximum(w, 0), np.minimum(w, 0)


def _conv(x, w, stride, padding, dilation, groups):
    """Cross-correlation as a sum over kernel offsets: x [B,C,H,W], w [O,C/g,kh,kw]."""
    b, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((b, o, ho, wo))
    og = o // groups
    for g in range(groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = w[g * og:(g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dilation[0], j * dilation[1]
                patch = xs[:, :, r0:r0 + stride[0] * (ho - 1) + 1:stride[0],
                           c0:c0 + stride[1] * (wo - 1) + 1:stride[1]]
                out[:, g * og:(g + 1) * og] += np.einsum("bchw,oc->bohw", patch, ws[:, :, i, j])
    return out


def _affine_bounds(apply, lo, hi, w):
    wp, wn = _pos_neg(w)
    return apply(lo, wp) + apply(hi, wn), apply(hi, wp) + apply(lo, wn)


def _scale(lo, hi, s):
    a, b = lo * s, hi * s
    return np.minimum(a, b), np.maximum(a, b)


def _avgpool(x, k, s, p):
    c = x.shape[1]
    w = np.zeros((c, 1, k[0], k[1])) + 1.0 / (k[0] * k[1])
    return _conv(x, w, s, p, (1, 1), c)


def reference_ibp(graph: Graph, lower: np.ndarray, upper: np.ndarray, C=None):
    """Bounds of the output (or of C·output, C folded into a final linear layer)."""
    P = {k: np.asarray(v, np.float64) for k, v in graph.params.items()}
    env = {}
    out = graph.output_node
    fold = (C is not None and out.op == "linear"
            and len(graph.node(out.inputs[0]).shape) == 1)
    for n in graph.nodes:
        if fold and n.name == out.name:
            break
        p = {r: P[k] for r, k in n.params.items()}
        xs = [env[i] for i in n.inputs]
        a = n.attrs
        if n.op == "input":
            env[n.name] = (np.asarray(lower, np.float64), np.asarray(upper, np.float64))
        elif n.op == "linear":
            lo, hi = _affine_bounds(lambda v, w: v @ w.T, *xs[0], p["weight"])
            bias = p.get("bias", 0.0)
            env[n.name] = (lo + bias, hi + bias)
        elif n.op == "conv2d":
            f = lambda v, w: _conv(v, w, a["stride"], a["padding"], a["dilation"], a["groups"])  # noqa
            lo, hi = _affine_bounds(f, *xs[0], p["weight"])
            bias = p.get("bias", np.zeros(p["weight"].shape[0]))[None, :, None, None]
            env[n.name] = (lo + bias, hi + bias)
        elif n.op == "relu":
            env[n.name] = (np.maximum(xs[0][0], 0), np.maximum(xs[0][1], 0))
        elif n.op in ("add", "sub"):
            (l1, u1) = xs[0]
            (l2, u2) = xs[1] if len(xs) == 2 else (p["other"], p["other"])
            env[n.name] = (l1 + l2, u1 + u2) if n.op == "add" else (l1 - u2, u1 - l2)
        elif n.op == "mul":
            env[n.name] = _scale(*xs[0], p["other"])
        elif n.op == "div":
            env[n.name] = _scale(*xs[0], 1.0 / p["other"])
        elif n.op == "batchnorm":
            shape = (-1,) + (1,) * (xs[0][0].ndim - 2)
            s = p["weight"] / np.sqrt(p["var"] + a["eps"])
            t = p["bias"] - p["mean"] * s
            lo, hi = _scale(*xs[0], s.reshape(shape))
            env[n.name] = (lo + t.reshape(shape), hi + t.reshape(shape))
        elif n.op in ("flatten", "reshape"):
            env[n.name] = tuple(v.reshape((v.shape[0],) + n.shape) for v in xs[0])
        elif n.op == "permute":
            env[n.name] = tuple(v.transpose(0, *(d + 1 for d in a["dims"])) for v in xs[0])
        elif n.op == "avgpool2d":
            env[n.name] = tuple(_avgpool(v, a["kernel_size"], a["stride"], a["padding"])
                                for v in xs[0])
        elif n.op == "identity":
            env[n.name] = xs[0]
        elif n.op == "concat":
            ax = a["axis"] + 1
            env[n.name] = (np.concatenate([x[0] for x in xs], ax),
                           np.concatenate([x[1] for x in xs], ax))
        else:
            raise NotImplementedError(n.op)
    C = None if C is None else np.asarray(C, np.float64)
    if fold:
        lo, hi = env[out.inputs[0]]
        cw = np.einsum("bsk,ki->bsi", C, P[out.params["weight"]])
        cb = C @ P[out.params["bias"]] if "bias" in out.params else 0.0
        pos, neg = _pos_neg(cw)
        return (np.einsum("bsi,bi->bs", pos, lo) + np.einsum("bsi,bi->bs", neg, hi) + cb,
                np.einsum("bsi,bi->bs", pos, hi) + np.einsum("bsi,bi->bs", neg, lo) + cb)
    lo, hi = env[out.name]
    if C is None:
        return lo, hi
    lo, hi = lo.reshape(len(lo), -1), hi.reshape(len(hi), -1)
    pos, neg = _pos_neg(C)
    return (np.einsum("bsi,bi->bs", pos, lo) + np.einsum("bsi,bi->bs", neg, hi),
            np.einsum("bsi,bi->bs", pos, hi) + np.einsum("bsi,bi->bs", neg, lo))
