"""The ``boundflow`` command line: argument parsing and printing only.

Every :class:`BoundFlowError` and every malformed argument is printed on one line
(``boundflow: error: ...``) and the command exits with status 2. Nothing heavy is imported
before a command runs (``boundflow --help`` loads neither torch nor TVM). ``verify
--timeout`` is a hard wall-clock limit over the whole run, start-up included: the work runs
in a forked child that is killed at the deadline (:mod:`boundflow.deadline`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from boundflow.errors import BoundFlowError, ModelLoadError, ShapeError

_IMPORTED = time.monotonic()       # the process's start, as near as this module can tell
log = logging.getLogger("boundflow")

DEFAULT_METHOD = "alpha-crown"     # of `verify`, for --model and --onnx alike


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"boundflow: error: {message} (see `{self.prog} --help`)\n")


def _number(kind: type, low: float | None = None, *, strict: bool = False,
            what: str = "a number"):
    """An argparse type: a finite ``kind`` that is >= ``low`` (> with ``strict``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        bad = not math.isfinite(value) or (low is not None and (
            value <= low if strict else value < low))
        if bad:
            bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"{text!r}: need a finite number{bound}")
        return value
    parse.__name__ = what
    return parse


_POSITIVE_INT = _number(int, 1, what="an integer")
MAX_THREADS = 4096                  # torch's thread pool crashes (a segfault) far above this
_COUNT = _number(int, 0, what="an integer")
_NONNEG = _number(float, 0)
_POSITIVE = _number(float, 0, strict=True)
_FINITE = _number(float)


def _target(text: str) -> str:
    from boundflow.target import TargetError, canonical_target

    try:
        return canonical_target(text)
    except TargetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _output_file(path: Path | None, what: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a missing directory,
    a directory in its place."""
    if path is None or str(path) == "-":
        return
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BoundFlowError(f"{what} {path}: the directory {parent} does not exist")
    if path.is_dir():
        raise BoundFlowError(f"{what} {path} is a directory; give a file name")
    if not os.access(parent, os.W_OK):
        raise BoundFlowError(f"{what} {path}: the directory {parent} is not writable")


def _output_dir(path: Path, what: str) -> None:
    """Refuse an output directory that is a file, or whose parent does not exist."""
    if path.exists() and not path.is_dir():
        raise BoundFlowError(f"{what} {path} exists and is not a directory")
    if not path.exists() and not path.parent.is_dir():
        raise BoundFlowError(f"{what} {path}: the directory {path.parent} does not exist")
    where = path if path.exists() else path.parent
    if not os.access(where, os.W_OK | os.X_OK):
        raise BoundFlowError(f"{what} {path}: {where} is not writable")


def _write_text(path: Path, text: str, what: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BoundFlowError(f"{what} {path}: {e.strerror or e}") from None


def _objective(text: str) -> str:
    """``text`` if it names a tuning objective, else a one-line error listing the forms."""
    from boundflow.search.objective import Objective

    return Objective.parse(text).name


def _check_target(args: argparse.Namespace, torch_too: bool = False) -> None:
    """Refuse, before any work, a backend that cannot run ``--target`` on this machine
    (``torch_too``: nor torch, which a property's whole-box bound and escalation run on)."""
    from boundflow.backend import create

    create(args.backend).check_target(args.target)
    if torch_too and args.backend != "torch":
        create("torch").check_target(args.target)


def _load_input(path: str, sample_shape: tuple[int, ...]):
    import numpy as np

    from boundflow.frontend.files import regular_file

    regular_file(path, ModelLoadError, "input file")
    try:
        with open(path, "rb") as f:           # the header first: its shape must fit the file
            version = np.lib.format.read_magic(f)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(f))
            size = os.fstat(f.fileno()).st_size - f.tell()
        if dtype.hasobject or math.prod(shape) * dtype.itemsize > size:
            raise ValueError(f"its header declares {list(shape)} of {dtype}, "
                             f"{'objects' if dtype.hasobject else 'more than the file holds'}")
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ModelLoadError(f"input file {path}: not a readable .npy array ({e})") from None
    if isinstance(x, np.lib.npyio.NpzFile):
        raise ModelLoadError(f"input file {path}: give a .npy array, not an .npz archive")
    if tuple(x.shape) == sample_shape:
        x = x[None]
    if tuple(x.shape[1:]) != sample_shape:
        raise ShapeError(f"input file {path} holds shape {list(x.shape)}; the model takes "
                         f"[{', '.join(map(str, sample_shape))}] or a batch of them")
    return x


def _table(result, predicted: bool) -> str:
    lower = result.bounds.lower.detach().cpu().numpy()
    upper = result.bounds.upper.detach().cpu().numpy()
    n_out = lower.shape[1] + 1
    rows = [f"{'sample':>6}  {'label':>5}  {'spec':<14} {'lower':>12} {'upper':>12}  verdict"]
    for b in range(lower.shape[0]):
        label = result.labels[b] if result.labels is not None else None
        others = [j for j in range(n_out) if j != label] if label is not None else None
        for s in range(lower.shape[1]):
            spec = f"y{label} - y{others[s]}" if others else f"spec {s}"
            rows.append(f"{b:>6}  {'' if label is None else label:>5}  {spec:<14} "
                        f"{lower[b, s]:>12.5g} {upper[b, s]:>12.5g}  {result.verdicts[b, s]}")
    done = result.verified
    source = "predicted at the box centre" if predicted else "given"
    rows.append(f"verified {int(done.sum())}/{len(done)} samples "
                f"(method {result.method}, labels {source}); per sample: "
                + " ".join("verified" if v else "unknown" for v in done))
    return "\n".join(rows)


def cmd_verify_property(args: argparse.Namespace) -> int:
    import numpy as np

    from boundflow.api import BoundOptions
    from boundflow.domains.alpha import AlphaConfig
    from boundflow.frontend.onnx import load_onnx
    from boundflow.frontend.vnnlib import load_vnnlib
    from boundflow.vnncomp import check_property, onnx_runner

    bab = _bab_config(args, args.backend)
    if args.db:
        from boundflow.db import Database

        _objective(args.objective)
        with Database(args.db, existing=True):   # read now: the search may end before a lookup
            pass
    graph = load_onnx(args.onnx)
    log.debug("loaded %s (%d nodes) at %.2f s", args.onnx, len(graph.nodes), _elapsed(args))
    n_in, n_out = int(np.prod(graph.input_shape)), int(np.prod(graph.output_shape))
    prop = load_vnnlib(args.vnnlib, n_in, n_out)
    log.debug("read %s (%d disjuncts) at %.2f s", args.vnnlib, len(prop.disjuncts), _elapsed(args))
    options = BoundOptions(args.method, alpha=AlphaConfig(iterations=args.alpha_iterations),
                           target=args.target)
    # the checks between steps answer in time on their own; the hard limit is the backstop
    soft = None if args.timeout is None else max(args.timeout - _elapsed(args) - _MARGIN, 1e-3)
    result = check_property(graph, prop, options, timeout=soft, confirm=onnx_runner(args.onnx),
                            bab=bab, db=args.db)
    text = result.vnncomp()
    if args.out:
        _write_text(args.out, text, "result file")
    if args.json:
        cex = result.counterexample
        print(json.dumps({"status": result.status, "seconds": result.seconds,
                          "refuted": result.refuted, "disjuncts": result.disjuncts,
                          "strategy": result.strategy, "domains": result.domains,
                          "bound_calls": result.bound_calls, "refined": result.refined,
                          "counterexample": None if cex is None else
                          {"x": cex[0].tolist(), "y": cex[1].tolist()}}))
    else:
        print(text, end="")
        how = args.method if result.strategy == "none" else \
            f"{bab.method} on {result.domains} domains ({result.strategy} splitting)" + (
                f", {result.refined} of them bounded again by alpha-crown"
                if result.refined else "")
        log.info("%s: %d/%d disjuncts refuted by %s in %.3f s", result.status,
                 result.refuted, result.disjuncts, how, result.seconds)
    return 0


def cmd_vnncomp(args: argparse.Namespace) -> int:
    """``boundflow vnncomp``: every instance of a CSV in one process, one line each; exit 1
    when a verdict contradicts the CSV's expected one, else 2 when an instance's files were
    bad (each said on its line, the others decided)."""
    import statistics

    from boundflow.api import BoundOptions
    from boundflow.domains.alpha import AlphaConfig
    from boundflow.vnncomp import read_instances, run_instances

    rows = read_instances(args.instances)
    _check_target(args, torch_too=True)  # a --target this machine cannot run: one line now
    bab = _bab_config(args, args.backend)
    if args.db:
        _objective(args.objective)
    _output_file(args.csv, "CSV file")
    if args.results is not None:                   # before any instance is solved
        _output_dir(Path(args.results), "results directory")
    options = BoundOptions(args.method, alpha=AlphaConfig(iterations=args.alpha_iterations),
                           backend=args.backend, target=args.target)
    root = args.root or args.instances.parent
    started = _elapsed(args)
    print(f"{'instance':<52} {'expected':>8} {'verdict':>8} {'total s':>8} {'solve s':>8} "
          f"{'domains':>8} {'dom/s':>8}", flush=True)

    def line(r) -> None:
        name = f"{Path(r.onnx).stem[:28]} {Path(r.vnnlib).stem[:22]}"
        res = r.result
        rate = res.domains / res.seconds if res.seconds > 0 else 0.0
        print(f"{name:<52} {r.expected or '-':>8} {res.status:>8} {r.total_s:>8.2f} "
              f"{res.seconds:>8.2f} {res.domains:>8} {rate:>8.0f}"
              + ("  WRONG" if r.wrong else "")
              + (f"  {res.notes[0]}" if res.status == "error" else ""), flush=True)
    results = run_instances(rows, root, options, bab, args.db, args.results, line)
    decided = [r for r in results if r.result.status in ("sat", "unsat")]
    fixed = [r.total_s - r.result.seconds for r in results]
    wrong = [r for r in results if r.wrong]
    errors = [r for r in results if r.result.status == "error"]
    print(f"decided {len(decided)}/{len(results)}, wrong {len(wrong)}, bad instances "
          f"{len(errors)}; median time per "
          f"instance {statistics.median(r.total_s for r in results):.2f} s; fixed cost per "
          f"instance (total - solving) median {statistics.median(fixed):.3f} s; process "
          f"start-up (imports) {started:.2f} s")
    if args.csv:
        import csv as csv_module

        with open(args.csv, "w", newline="") as f:
            w = csv_module.writer(f)
            w.writerow(["onnx", "vnnlib", "expected", "status", "total_s", "solve_s", "load_s",
                        "domains", "bound_calls", "strategy"])
            for r in results:
                w.writerow([r.onnx, r.vnnlib, r.expected, r.result.status, f"{r.total_s:.4f}",
                            f"{r.result.seconds:.4f}", f"{r.load_s:.4f}", r.result.domains,
                            r.result.bound_calls, r.result.strategy])
    return 1 if wrong else 2 if errors else 0


_MARGIN = 0.3       # seconds the soft limit leaves for printing before the hard one


def _elapsed(args: argparse.Namespace) -> float:
    """Seconds since the command started (its process's start when run as `boundflow`)."""
    return time.monotonic() - args.start


def _timed_out(args: argparse.Namespace) -> int:
    """The answer of a run the hard limit stopped: ``timeout``, as VNN-COMP expects it."""
    if args.onnx:
        if args.out:
            _write_text(args.out, "timeout\n", "result file")
        print(json.dumps({"status": "timeout", "seconds": round(_elapsed(args), 3)}) if args.json
              else "timeout")
    else:
        print(json.dumps({"status": "timeout", "seconds": round(_elapsed(args), 3)}) if args.json
              else f"timeout: no answer within {args.timeout:g} s")
    log.warning("timeout after %.2f s (--timeout %g)", _elapsed(args), args.timeout)
    return 0


def _set_threads(n: int | None) -> None:
    """Bound with ``n`` threads (torch's and TVM's pools; the forked child of ``--timeout``
    inherits them). Where another process holds a core, fewer threads than cores avoid
    threads waiting on each other: ACAS Xu 1_1 property 3 solved in 3.1 s on one thread
    against 6.2 s on two with one of the two cores busy (2.0 s on two when idle)."""
    if n is None:
        return
    from boundflow.measure.worker import set_threads

    os.environ["TVM_NUM_THREADS"] = str(n)       # TVM, imported later, sizes its pool by it
    set_threads(n, compiled=False)
    log.info("%d thread%s", n, "" if n == 1 else "s")


def cmd_verify(args: argparse.Namespace) -> int:
    """``boundflow verify``: check the arguments, then do the work, under the hard limit of
    ``--timeout`` when one is given."""
    if args.onnx or args.vnnlib:
        if not (args.onnx and args.vnnlib) or args.model or args.input or args.eps is not None:
            raise BoundFlowError("give --onnx with --vnnlib, or --model with --input and --eps")
        if args.dtype:
            raise BoundFlowError("--dtype does not go with --vnnlib: a property is decided in "
                                 "the ONNX model's own precision")
        if args.plan:
            raise BoundFlowError("--plan runs with --model inputs, not with --onnx/--vnnlib "
                                 "(--db looks up the plan of the branch-and-bound's bound "
                                 "workload, recorded by `boundflow tune --vnnlib`)")
        _output_file(args.out, "result file")
        _check_target(args, torch_too=True)  # a --target this machine cannot run: one line
        work = cmd_verify_property
    else:
        if not (args.model and args.input and args.eps is not None):
            raise BoundFlowError("give --model with --input and --eps, or --onnx with --vnnlib")
        if args.out:
            raise BoundFlowError("--out writes a VNN-COMP result file: it goes with "
                                 "--onnx/--vnnlib (use --json for --model results)")
        if args.plan and (args.method_given or args.dtype):
            raise BoundFlowError("--plan fixes the method and dtype; drop --method / --dtype")
        if args.plan and args.db:
            raise BoundFlowError("give --plan or --db, not both")
        _check_target(args)
        _objective(args.objective)         # checked even where unused: a typo is not ignored
        _bab_config(args)
        work = _verify_model
    _set_threads(args.threads)
    if args.timeout is None:
        return work(args)
    from boundflow.deadline import run_with_deadline

    def child() -> int:
        try:
            return work(args)
        except BoundFlowError as e:
            _print_error(e)
            return 2
    return run_with_deadline(child, args.argv, args.start + args.timeout,
                             lambda: _timed_out(args))


def _verify_model(args: argparse.Namespace) -> int:
    from boundflow.api import verify
    from boundflow.domains.alpha import AlphaConfig
    from boundflow.frontend.pt2 import load_model

    graph = load_model(args.model)
    x = _load_input(args.input, graph.input_shape)
    log.debug("loaded %s and %d inputs at %.2f s", args.model, len(x), _elapsed(args))
    bundle = _read_plan(args.plan) if args.plan else None
    start = time.perf_counter()
    result = verify(graph, x, eps=args.eps, labels=args.label, method=args.method,
                    alpha=AlphaConfig(iterations=args.alpha_iterations),
                    clip=tuple(args.clip) if args.clip else None, dtype=args.dtype,
                    plan=bundle, backend=args.backend, target=args.target, db=args.db,
                    objective=args.objective, calls=1)          # one query per process
    seconds = time.perf_counter() - start
    if args.json:
        out = result.to_dict()
        if result.tuned is not None:
            out["tuned"] = {"plan": result.tuned.bundle.key, "backend": result.tuned.backend,
                            "lookup_seconds": result.tuned.lookup_seconds,
                            "tuned_median_s": result.tuned.median_s}
        print(json.dumps(out))
    else:
        print(_table(result, predicted=args.label is None))
        t = result.tuned
        if t is not None:
            print(f"plan: tuned ({t.objective}, {t.backend} backend, {t.median_s * 1e3:.3f} ms "
                  f"when measured); database lookup {t.lookup_seconds * 1e3:.1f} ms, "
                  f"verify total {seconds:.2f} s (load or compile included)")
    return 0


def _read_plan(path: Path):
    from boundflow.ir.plan import PlanBundle

    from boundflow.frontend.files import read_text

    return PlanBundle.from_json(read_text(path, BoundFlowError, "plan file"))


def cmd_plan(args: argparse.Namespace) -> int:
    from boundflow.ir.knobs import Knobs
    from boundflow.ir.workload import Workload
    from boundflow.planner import plan
    from boundflow.planner.show import describe

    if args.show:
        if args.model or args.onnx or args.out:
            raise BoundFlowError("--show reads a plan file; give it alone")
        print(describe(_read_plan(args.show)))
        return 0
    if bool(args.model) == bool(args.onnx):
        raise BoundFlowError("give one model: --model file.pt2 or --onnx file.onnx "
                             "(or --show plan.json)")
    _output_file(args.out, "plan file")
    graph = _load_graph(args)
    workload = Workload.of(graph, batch=args.batch, n_specs=args.n_specs, method=args.method,
                           dtype=args.dtype, target=args.target)
    knobs = None
    if args.knobs:
        from boundflow.frontend.files import read_text

        knobs = Knobs.from_json(read_text(args.knobs, BoundFlowError, "knobs file"))
    bundle = plan(graph, workload, knobs)
    if args.out:
        _write_text(args.out, bundle.to_json(indent=1), "plan file")
    print(describe(bundle))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """``boundflow db show|export|import``: read, and move records between machines."""
    from boundflow.db import Database

    if args.action == "export":
        _output_file(Path(args.file), "export file")
    with Database(args.db, existing=args.action != "import") as db:
        if args.action == "show":
            s = db.summary()
            failures = ", ".join(f"{k} {v}" for k, v in s["failures"].items()) or "none"
            runs = ", ".join(f"{k} {v}" for k, v in sorted(s.get("runs", {}).items()))
            print(f"{db.shown()}: {s['workloads']} workloads, {s['candidates']} candidates, "
                  f"{s['measurements']} measurements (failed: {failures}), "
                  f"{s['cost_models']} cost models, {s['tuning_runs']} tuning runs"
                  + (f" ({runs})" if runs else ""))
            for w in db.workloads():
                if args.workload and not w.key.startswith(args.workload):
                    continue
                wl = w.workload
                ops = w.summary.get("ops", {})
                side = "" if wl.upper else " (lower bounds)"
                print(f"\nworkload {w.key[:12]}  {wl.method}{side} batch {wl.batch} specs "
                      f"{wl.n_specs} "
                      f"{wl.dtype} on {wl.target}  ({w.summary.get('nodes', '?')} nodes: "
                      f"{', '.join(f'{k} {v}' for k, v in ops.items())})")
                print(f"  {'plan':<14} {'backend':<7} {'median ms':>10} {'width':>10} "
                      f"{'verified':>8} {'kernels':>7} {'peak KiB':>9}")
                for r in db.top_k(wl, args.top):
                    m = r.measurement.result
                    width = float("nan") if m.mean_width is None else m.mean_width
                    proved = float("nan") if m.verified_fraction is None else m.verified_fraction
                    print(f"  {r.candidate.key[:12]:<14} {m.backend:<7} "
                          f"{m.median_s * 1e3:>10.3f} {width:>10.4g} {proved:>8.2f} "
                          f"{m.n_kernels or 0:>7} {(m.peak_bytes or 0) / 1024:>9.1f}")
                from boundflow.search.lookup import describe_best

                fastest = db.best(wl)
                if fastest is not None:
                    m = fastest.measurement.result
                    print(f"  fastest measured: {fastest.candidate.key[:12]} ({m.backend}, "
                          f"{m.median_s * 1e3:.3f} ms)")
                line = describe_best(db, wl, args.objective)
                print(f"  {line or f'best ({args.objective}): none recorded by a tune'}")
        elif args.action == "export":
            try:
                out = sys.stdout if str(args.file) == "-" else open(args.file, "w")
            except OSError as e:
                raise BoundFlowError(f"export file {args.file}: {e.strerror or e}") from None
            try:
                n = db.export_jsonl(out, args.workload)
            finally:
                if out is not sys.stdout:
                    out.close()
            log.info("exported %d measurements", n)
        else:
            import io

            from boundflow.frontend.files import open_input

            src = sys.stdin if str(args.file) == "-" else io.TextIOWrapper(
                open_input(args.file, BoundFlowError, "import file"), encoding="utf-8")
            with src:
                counts = db.import_jsonl(src)
            print(f"imported {counts['added']} measurements ({counts['skipped']} already there)")
    return 0


def _load_graph(args: argparse.Namespace):
    if bool(args.model) == bool(args.onnx):
        raise BoundFlowError("give one model: --model file.pt2 or --onnx file.onnx")
    if args.onnx:
        from boundflow.frontend.onnx import load_onnx
        return load_onnx(args.onnx)
    from boundflow.frontend.pt2 import load_model
    return load_model(args.model)


def cmd_tune(args: argparse.Namespace) -> int:
    """``boundflow tune``: measure plans of one workload into the database, print default vs
    best."""
    from boundflow.api import query
    from boundflow.db import Database
    from boundflow.measure import MeasureConfig
    from boundflow.search import Tuner

    if args.vnnlib:
        if not args.onnx or args.input or args.eps is not None or args.model:
            raise BoundFlowError("--vnnlib tunes the branch-and-bound workload of a property: "
                                 "give it with --onnx, without --model/--input/--eps")
        if args.dtype:
            raise BoundFlowError("--dtype does not go with --vnnlib: verify's branch-and-bound "
                                 "bounds in the model's own precision, the workload tuned")
        args.alpha_iterations = 20 if args.alpha_iterations is None else args.alpha_iterations
    elif args.alpha_iterations is not None:
        raise BoundFlowError("--alpha-iterations sets the whole-box bound before a --vnnlib "
                             "search; give it with --vnnlib")
    elif not (args.input and args.eps is not None):
        raise BoundFlowError("give --input and --eps (the query the plans are measured on), "
                             "or --onnx with --vnnlib (the bound workload of its "
                             "branch-and-bound)")
    backends = _backend_set(args.backend)
    from boundflow.backend import create

    for name in backends:                          # measuring runs the plans here
        create(name).check_target(args.target)
    _objective(args.objective)
    graph = _load_graph(args)
    if args.vnnlib:
        whole = args.method or DEFAULT_METHOD
        args.method, queries, backends, strategy = _bab_workload(args, graph, backends)
    else:
        args.method = args.method or "crown-ibp"
        x = _load_input(args.input, graph.input_shape)
        graph, spec, linear, _, _ = query(graph, x, eps=args.eps, labels=args.label,
                                          clip=tuple(args.clip) if args.clip else None,
                                          dtype=args.dtype)
        queries = [(spec.lower, spec.upper, linear.C)]
    config = MeasureConfig(number=args.number, repeat=args.repeat, timeout_s=args.timeout,
                           memory_limit_mb=args.memory_limit, threads=args.threads)
    start = time.monotonic()
    with Database(args.db) as db:
        for i, (lower, upper, C) in enumerate(queries):
            if len(queries) > 1:
                print(f"workload {i + 1} of {len(queries)}: the searches of {C.shape[1]} spec "
                      f"rows")
            # a time budget is shared: each workload the rest over the workloads left
            seconds = None if args.seconds is None else \
                (args.seconds - (time.monotonic() - start)) / (len(queries) - i)
            if seconds is not None and seconds <= 0:
                # the ones before ran over (a tune always measures its baseline)
                left = f"{i + 1}" if i + 1 == len(queries) else f"{i + 1}-{len(queries)}"
                print(f"--seconds {args.seconds:g} spent: workload {left} of {len(queries)} "
                      f"not tuned (their searches run the default plan)")
                break
            tuner = Tuner(graph, lower, upper, C, method=args.method, db=db,
                          pretrained=not args.no_pretrained,
                          strategy=args.strategy, backend=backends, target=args.target,
                          objective=args.objective, dtype=args.dtype, config=config,
                          batch_size=args.batch_size, seed=args.seed,
                          progress=not args.no_progress)
            try:
                report = tuner.tune(args.trials, seconds)
            finally:
                tuner.close()
            _print_tune(report, tuner)
    if args.vnnlib:
        bab = "" if args.bab == "auto" else f" --bab {args.bab}"
        # the batch tuned for, resolved: verify on a machine of other cores plans the same
        batch = f" --bab-batch {queries[0][0].shape[0]}" if queries else ""
        alpha = "" if args.alpha_iterations == 20 else \
            f" --alpha-iterations {args.alpha_iterations}"
        print(f"recorded in {args.db}; run it with: boundflow verify --onnx {args.onnx} "
              f"--vnnlib {args.vnnlib} --method {whole}{alpha}{bab}{batch} --bab-method "
              f"{args.method} --db {args.db}")
    else:
        print(f"recorded in {args.db}; run it with: boundflow verify ... --method "
              f"{args.method} --db {args.db}")
    return 0


def _print_tune(report, tuner) -> None:
    """What ``tune`` prints of one workload's run: the workload, the search, default vs
    best measured together."""
    from boundflow.backend import create
    from boundflow.backend.base import import_seconds

    if any(create(b).needs_build for b in tuner.backends):
        import_seconds("tvm", here=False)          # what verify weighs a tuned plan against
    d, b = report.default, report.best
    first = report.first_measurement_s
    side = "" if report.workload.upper else " (lower bounds, as verify reads them)"
    print(f"workload {report.workload.key[:12]}: {report.workload.method}{side}, batch "
          f"{report.workload.batch}, backends {','.join(tuner.backends)} on "
          f"{tuner.workload.target}; "
          f"objective {report.objective}; {report.measured_now} plans measured now, "
          f"{report.measured_before} before ({report.measured_by_others} by other runs), "
          f"{report.seconds:.0f} s" + ("" if first is None else
                                      f", first measurement at {first:.1f} s"))
    if report.challenges:
        changed = len(report.held) - 1
        print(f"the search's incumbent changed {changed} time{'' if changed == 1 else 's'}, "
              f"each after winning side by side ({report.challenges} challenge"
              f"{'' if report.challenges == 1 else 's'})")
    if report.cost_model:
        print(f"cost model: {report.cost_model}")
    print("default = the path `boundflow verify` runs without --db (torch, default plan); "
          "both timed as the whole call, together in one final pass")
    print(f"{'plan':<8} {'backend':<7} {'call ms':>9} {'kernel ms':>10} {'speedup':>8} "
          f"{'mean width':>11} {'verified':>9} {'kernels':>8}")
    for name, r, backend in (("default", d, report.default_backend),
                             ("best", b, report.best_backend)):
        kernel = r.kernel_s * 1e3 if r.kernel_s is not None else float("nan")
        print(f"{name:<8} {backend:<7} {r.median_s * 1e3:>9.3f} {kernel:>10.3f} "
              f"{d.median_s / r.median_s:>7.2f}x {r.mean_width:>11.5g} "
              f"{r.verified_fraction or 0:>9.2f} {r.n_kernels or 0:>8}")
    if report.kept_default:
        print("no plan beat the default path (by the 3% margin, in most paired rounds): "
              "`verify --db` keeps running the default path")
    else:
        print(f"best plan {report.best_bundle.key[:12]} ({report.best_backend}, "
              f"{report.speedup:.2f}x the default path): {report.best_description}")


def _costmodel_train(args: argparse.Namespace) -> int:
    """Write every measured record of ``--db`` as the training set the tuner starts from
    (:mod:`boundflow.costmodel.pretrained`), then say how well a model of it ranks the plans
    of workloads it did not see (leave one workload out)."""
    import datetime
    import os
    import platform

    import numpy as np

    from boundflow.costmodel import pretrained
    from boundflow.costmodel.inspect import held_out, training_set
    from boundflow.db import Database

    out = args.out or pretrained.PATH
    if args.out is None:
        out.parent.mkdir(parents=True, exist_ok=True)
    _output_file(out, "training set")
    exclude = [e.strip() for e in args.exclude.split(",") if e.strip()]
    with Database(args.db, existing=True) as db:
        X, Y, groups = training_set(db.records_for_training())
        quality = held_out(db) if len(X) else {}
    if exclude:
        left = np.array([any(g.startswith(e) for e in exclude) for g in groups], bool)
        unmatched = [e for e in exclude if not any(g.startswith(e) for g in groups)]
        if unmatched:
            raise BoundFlowError(f"--exclude names no workload of {args.db}: {unmatched}")
        X, Y, groups = X[~left], {h: v[~left] for h, v in Y.items()}, groups[~left]
    if len(np.unique(groups)) < 2:
        raise BoundFlowError(f"{args.db} holds measurements of {len(np.unique(groups))} "
                             f"workload(s); a model that transfers needs several (build them "
                             f"with tools/costmodel_dataset.py)")
    about = {"db": str(args.db), "records": int(len(X)), "excluded": exclude,
             "workloads": int(len(np.unique(groups))),
             "made": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "machine": f"{platform.machine()} {platform.processor() or ''} "
                        f"{os.cpu_count()} cores".strip(),
             "held_out": quality}
    pretrained.save(out, X, Y, groups, about)
    print(f"wrote {out}: {len(X)} measured plans of {about['workloads']} workloads")
    for name, h in quality.items():
        print(f"  leave one workload out over {args.db}, {name:<8}: spearman {h['spearman']:.3f}, kendall "
              f"{h['kendall']:.3f}, top-5 recall {h['top_k_recall']:.2f}, relative-time MAPE "
              f"{h['mape']:.2f}")
    return 0


def _bab_workload(args: argparse.Namespace, graph, backends: tuple[str, ...]):
    """(method, queries, backends, strategy) of the bound workloads the branch-and-bound of
    ``--vnnlib`` runs: one per number of spec rows its searches bound (a search's plan is
    looked up by the model, batch, rows and method; boxes with the same number share it),
    each query ``(lower, upper, C)`` the batch its plans are measured on: ``--bab-batch``
    domains of the first input box with that many rows (sub-boxes for input splitting, the
    whole box for ReLU splitting, whose domains differ only in their split state), with the
    rows that search bounds: every row of the box for input splitting; for ReLU splitting,
    the rows of the disjuncts the whole-box bound (``--method``, as verify's) leaves open,
    as verify does."""
    from boundflow.bab import choose_strategy

    import numpy as np
    import torch

    from boundflow.api import BoundOptions
    from boundflow.bab.bounder import float_box, sample_domains
    from boundflow.domains.alpha import AlphaConfig
    from boundflow.frontend.vnnlib import load_vnnlib
    from boundflow.target import canonical_target
    from boundflow.vnncomp import searches, whole_boxes

    config = _bab_config(args)
    n_in, n_out = int(np.prod(graph.input_shape)), int(np.prod(graph.output_shape))
    prop = load_vnnlib(args.vnnlib, n_in, n_out)
    groups = [g for g in prop.groups() if g[1] is not None]
    if not groups:
        raise BoundFlowError(f"{args.vnnlib} has no output constraints to bound")
    strategy = choose_strategy(config, n_in, any(n.op == "relu" for n in graph.nodes))
    dtype = torch.float64 if graph.dtype == "float64" else torch.float32   # the search's
    if strategy == "relu" and args.target != canonical_target("llvm"):
        raise BoundFlowError(f"the property's branch-and-bound splits ReLUs, whose plans run "
                             f"on the CPU (torch, target llvm): tune it without --target "
                             f"{args.target}")
    if strategy == "relu" and backends != ("torch",):
        if "torch" not in backends:
            raise BoundFlowError("the property's branch-and-bound splits ReLUs, whose "
                                 "split state only the torch backend takes: tune it "
                                 "with --backend torch")
        log.info("ReLU splitting runs on the torch backend: tuning its plans there")
        backends = ("torch",)
    if strategy == "relu":
        first = args.method or DEFAULT_METHOD
        options = BoundOptions(first, alpha=AlphaConfig(iterations=args.alpha_iterations))
        refuted, open_disjuncts, _ = whole_boxes(graph, groups, options, dtype)
        if not open_disjuncts:
            raise BoundFlowError(f"the whole-box {first} bound refutes every disjunct of "
                                 f"{args.vnnlib}: verify decides it without branch-and-bound, "
                                 f"so there is no search to tune")
        log.info("the whole-box %s bound refutes %d of %d disjuncts; the search bounds the "
                 "rest", first, refuted, refuted + len(open_disjuncts))
    else:
        open_disjuncts = [(box, spec, a, b) for box, spec, ranges in groups for a, b in ranges]
    queries, rows = [], set()
    for box, C, _, _ in searches(open_disjuncts):
        if len(C) in rows:              # the same workload as a box before (its plan serves)
            continue
        rows.add(len(C))
        batch = config.batch_for(strategy)
        if strategy == "relu":
            lo = np.repeat(np.asarray(box.lower[0], np.float64).reshape(1, -1), batch, 0)
            hi = np.repeat(np.asarray(box.upper[0], np.float64).reshape(1, -1), batch, 0)
        else:
            lo, hi = sample_domains(box.lower[0], box.upper[0], batch, args.seed)
        lo, hi = float_box(lo, hi, dtype)
        shape = (batch,) + tuple(graph.input_shape)
        queries.append((lo.numpy().reshape(shape), hi.numpy().reshape(shape),
                        np.ascontiguousarray(np.broadcast_to(C, (batch,) + C.shape))))
        log.info("tuning the branch-and-bound workload of %s (%s splitting): %d domains, %d "
                 "spec rows, %s", args.vnnlib, strategy, batch, len(C), config.method)
    return config.method, queries, backends, strategy


def _backend_set(text: str | None) -> tuple[str, ...]:
    """``--backend`` of tune: comma-separated backend names, default every registered one."""
    from boundflow.backend import create, names

    if not text:
        return names()
    chosen = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    for name in chosen:
        create(name)                               # names the valid ones if not
    if not chosen:
        raise BoundFlowError("--backend names no backend; give e.g. torch,relax")
    return chosen


def cmd_costmodel(args: argparse.Namespace) -> int:
    """``boundflow costmodel inspect``: the dataset, held-out quality, importances, plots;
    ``train``: the shipped training set from a database."""
    from boundflow.costmodel.inspect import plot, report
    from boundflow.db import Database

    if args.action == "train":
        return _costmodel_train(args)
    _output_file(args.plot, "plot file")
    with Database(args.db, existing=True) as db:
        rep = report(db, args.workload)
        if args.json:
            print(json.dumps(rep, default=str))
        else:
            s = rep["summary"]
            failures = ", ".join(f"{k} {v}" for k, v in s["failures"].items()) or "none"
            print(f"dataset: {s['workloads']} workloads, {s['candidates']} candidates, "
                  f"{s['measurements']} measurements; failures by kind: {failures}")
            if s["measurements"] == 0:
                print("the database has no measurements yet: run `boundflow tune` first")
            if rep["model"] is None:
                print("no cost model stored in this database (`boundflow tune` trains and "
                      "stores one)")
            else:
                m = rep["model"]
                print(f"stored model: {m['name']} ({m['feature_version']}), trained on "
                      f"{m['metrics'].get('n_train', '?')} measurements"
                      + (f"; cannot load: {m['error']}" if "error" in m else ""))
            if rep["held_out"]:
                print(f"held-out quality ({rep.get('held_out_split', 'held out')}; ranking "
                      f"within each workload):")
                print(f"  {'model':<10} {'spearman':>9} {'kendall':>8} {'top-5 recall':>13} "
                      f"{'MAPE':>7} {'points':>7}")
                for name, h in rep["held_out"].items():
                    print(f"  {name:<10} {h['spearman']:>9.3f} {h['kendall']:>8.3f} "
                          f"{h['top_k_recall']:>13.2f} {h['mape']:>7.2f} {h['n']:>7}")
            for head, imp in rep["importance"].items():
                top = list(imp.items())[:8]
                if top:
                    print(f"importance (gain) for {head}: "
                          + ", ".join(f"{k} {v:.3g}" for k, v in top))
            for w in rep["workloads"]:
                print(f"workload {w['key'][:12]} ({w['method']}, batch {w['batch']}, "
                      f"{w['target']})")
                for objective, b in w["best"].items():
                    print(f"  best {objective}: {b['plan'][:12]} {b['backend']} "
                          f"{b['median_ms']:.3f} ms, width {b['mean_width']:.4g}: {b['knobs']}")
        if args.plot:
            if int(rep["summary"]["measurements"]) == 0:
                print("nothing to plot: no measurements")
            else:
                what = plot(db, args.plot)
                print(f"wrote {args.plot} ({what})")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """``boundflow ablate``: the on/off matrix of passes and knobs, as CSV and plots."""
    from boundflow import ablate
    from boundflow.api import query
    from boundflow.measure import MeasureConfig

    if not (args.input and args.eps is not None):
        raise BoundFlowError("give --input and --eps (the query the configurations run on)")
    _check_target(args)
    out = Path(args.out)
    _output_dir(out, "--out")
    graph = _load_graph(args)
    x = _load_input(args.input, graph.input_shape)
    graph, spec, linear, _, _ = query(graph, x, eps=args.eps, labels=args.label)
    if args.config:
        configs = ablate.read_config(args.config)
    else:
        configs = ablate.configurations([t.strip() for t in args.toggle.split(",") if t.strip()],
                                        args.backend)
    rows = ablate.run(graph, spec.lower, spec.upper, linear.C, method=args.method,
                      configs=configs, backend=args.backend, target=args.target,
                      config=MeasureConfig(number=args.number, repeat=args.repeat,
                                           warmup=2, timeout_s=args.timeout),
                      progress=not args.no_progress)
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise BoundFlowError(f"--out {out}: {e.strerror or e}") from None
    ablate.write_csv(rows, out / "ablation.csv")
    name = (args.model or args.onnx).stem
    ablate.plot(rows, out / "ablation.png",
                f"{name}: {args.method}, batch {len(x)}, {args.backend} on {args.target}")
    for line in ablate.effects(rows):
        print(line)
    print(f"wrote {out / 'ablation.csv'} and {out / 'ablation.png'}")
    return 0


def _query_arguments(p: argparse.ArgumentParser) -> None:
    """The model and the query its plans are measured on (tune, ablate)."""
    p.add_argument("--model", type=Path, help="a program saved with torch.export.save (.pt2)")
    p.add_argument("--onnx", type=Path, help="an ONNX model (.onnx or .onnx.gz)")
    p.add_argument("--input", help=".npy with the batch of inputs the plans are measured on")
    p.add_argument("--eps", type=_NONNEG, help="L-infinity radius around each input")
    p.add_argument("--label", type=_COUNT, nargs="+",
                   help="true class per sample (default: the predicted class)")


def _bab_arguments(p: argparse.ArgumentParser) -> None:
    """The branch-and-bound of a VNN-LIB property (verify, tune --vnnlib, vnncomp)."""
    p.add_argument("--bab", choices=["auto", "input", "relu", "none"], default="auto",
                   help="branch-and-bound for what the whole box leaves open: input (split "
                   "the input box), relu (split unstable ReLUs, beta-CROWN), none, or auto "
                   "(input splitting for inputs of at most 16 dimensions, ReLU splitting "
                   "above; default)")
    p.add_argument("--bab-batch", type=_POSITIVE_INT, default=None,
                   help="domains bounded per plan run (default: input splitting 512 per "
                   "core, 1024 to 8192; ReLU splitting 1024)")
    p.add_argument("--bab-method", default="crown",
                   help="the bound of each domain: ibp, crown-ibp, crown or alpha-crown "
                   "(default crown)")
    p.add_argument("--branching", choices=["combined", "sensitivity", "coefficients",
                                           "widest"], default="combined",
                   help="input splitting's dimension to bisect: the largest width x the "
                   "spec row's gradient at the box centre and its CROWN coefficient, the "
                   "geometric mean of their shares of the box's sums (combined; default), "
                   "x the gradient alone "
                   "(sensitivity), x the coefficient alone (coefficients), or the widest")
    p.add_argument("--max-domains", type=_POSITIVE_INT, default=1_000_000,
                   help="open domains kept at most; past it the answer is unknown "
                   "(default 1000000)")
    p.add_argument("--queue-mb", type=_POSITIVE_INT, default=2048,
                   help="memory the open domains may hold, MiB; past it the answer is "
                   "unknown (default 2048)")
    p.add_argument("--bab-screen", choices=["none", "forward"], default="none",
                   help="input splitting: bound each batch of boxes with the plan alone "
                   "(none; default), or first with forward-mode intermediate bounds and "
                   "the plan's final bound, in full only the boxes that leaves open "
                   "(forward: faster with --branching widest)")
    p.add_argument("--bab-escalate", choices=["alpha", "none"], default="alpha",
                   help="input splitting: once the search has spent 1 s in bound calls, "
                   "bound the boxes the plan leaves open again with alpha-CROWN in the "
                   "rounds where that closes more of the box per second (alpha; default; "
                   "off with --bab-method alpha-crown), or never (none)")
    p.add_argument("--bab-intermediate", choices=["refine", "reuse"], default="reuse",
                   help="ReLU splitting: reuse each domain's parent's intermediate bounds and "
                   "compute only the final bound (reuse; default), or recompute them and keep "
                   "them tighter than the parent's (refine)")


def _bab_config(args: argparse.Namespace, backend: str = "torch"):
    from boundflow.bab import BabConfig

    return BabConfig(strategy=args.bab, batch=args.bab_batch, branching=args.branching,
                     max_domains=max(args.max_domains, 2), method=args.bab_method,
                     backend=backend, queue_mb=max(args.queue_mb, 2),
                     intermediate=getattr(args, "bab_intermediate", "reuse"),
                     screen=getattr(args, "bab_screen", "none"),
                     escalate=getattr(args, "bab_escalate", "alpha"),
                     target=getattr(args, "target", "llvm"))


def _method(p: argparse.ArgumentParser, default: str | None, what: str) -> None:
    p.add_argument("--method", default=default,
                   help=f"ibp, crown-ibp, crown or alpha-crown ({what})")


def _backend(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--backend", choices=["torch", "relax"], default=default,
                   help=f"torch ops or TVM Relax with TIR kernels (default {default})")
    p.add_argument("--target", type=_target, default="llvm",
                   help="where the plans run: llvm (the CPU) or cuda (the GPU: torch on it, "
                   "or Relax compiled for it), as TVM's string (\"llvm -mcpu=x86-64\") or "
                   "JSON form ('{\"kind\": \"llvm\"}'); default llvm")


def _measure_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """How each candidate is timed (tune, ablate)."""
    p.add_argument("--number", type=_POSITIVE_INT, default=5, help="runs per timing (default 5)")
    p.add_argument("--repeat", type=_POSITIVE_INT, default=5,
                   help=f"timings per {what} (default 5)")
    p.add_argument("--timeout", type=_POSITIVE, default=120.0,
                   help=f"seconds per build or run of one {what} (default 120); a slow "
                   f"{what} is timed with fewer calls so its measurement, load and first "
                   f"call included, ends within 80%% of it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _logging_options(p: argparse.ArgumentParser, top: bool) -> None:
    default = 0 if top else argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="say more (the time each step took)")
    p.add_argument("-q", "--quiet", action="store_true",
                   default=False if top else argparse.SUPPRESS,
                   help="print results and errors only")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="boundflow", description="BoundFlow: certified bounds of neural "
                     "networks (IBP, CROWN-IBP, CROWN, alpha-CROWN), computed by plans a "
                     "compiler tunes.")
    from boundflow import __version__

    parser.add_argument("--version", action="version", version=f"boundflow {__version__}",
                        help="print the version and exit")
    _logging_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    v = sub.add_parser("verify", help="prove robustness around inputs, or a VNN-LIB property")
    v.add_argument("--model", type=Path, help="a program saved with torch.export.save (.pt2)")
    v.add_argument("--input", help=".npy with one input or a batch of inputs (batch first)")
    v.add_argument("--eps", type=_NONNEG, help="L-infinity radius around each input")
    v.add_argument("--onnx", type=Path, help="an ONNX model, .onnx or .onnx.gz (with --vnnlib)")
    v.add_argument("--vnnlib", type=Path,
                   help="a VNN-LIB property, .vnnlib or .vnnlib.gz (with --onnx)")
    v.add_argument("--timeout", type=_POSITIVE,
                   help="hard wall-clock limit in seconds for the whole run, start-up "
                   "included; past it the answer is `timeout`")
    v.add_argument("--out", type=Path, help="write the VNN-COMP result file here (--vnnlib)")
    v.add_argument("--threads", type=_POSITIVE_INT, default=None,
                   help="threads to bound with (default: the machine's cores; fewer where "
                   "other processes hold some)")
    v.add_argument("--alpha-iterations", type=_COUNT, default=20,
                   help="optimisation steps of alpha-crown (default 20)")
    v.add_argument("--label", type=_COUNT, nargs="+",
                   help="true class per sample (one label for all); default: predicted class")
    _method(v, None, f"default {DEFAULT_METHOD}, for --model and --onnx alike")
    v.add_argument("--clip", type=_FINITE, nargs=2, metavar=("LO", "HI"),
                   help="clip the input box to [LO, HI]")
    v.add_argument("--dtype", choices=["float32", "float64"],
                   help="compute precision (default: the model's)")
    v.add_argument("--plan", type=Path,
                   help="run this plan (from `boundflow plan --out`); it is checked first")
    _backend(v, "torch")
    v.add_argument("--db", help="run the plan `boundflow tune` recorded in this tuning "
                   "database (a file or an SQLAlchemy URL); the default plan when none")
    v.add_argument("--objective", default="time@width",
                   help="which tuned plan to look up: time, time@width, time@mem:BYTES or "
                   "mix:A,B (default time@width)")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    _bab_arguments(v)
    _logging_options(v, top=False)
    v.set_defaults(func=cmd_verify)

    p = sub.add_parser("plan", help="build a PlanBundle for a model, or show one")
    p.add_argument("--model", type=Path, help="a program saved with torch.export.save (.pt2)")
    p.add_argument("--onnx", type=Path, help="an ONNX model (.onnx or .onnx.gz)")
    _method(p, "crown", "default crown")
    p.add_argument("--batch", type=_POSITIVE_INT, default=1,
                   help="batch size to plan for (default 1)")
    p.add_argument("--n-specs", type=_COUNT, default=None,
                   help="rows of C (default: a margin spec, one per other class; 0: raw "
                        "output bounds)")
    p.add_argument("--dtype", choices=["float32", "float64"],
                   help="compute precision (default: the model's)")
    p.add_argument("--target", type=_target, default="llvm",
                   help="llvm or cuda, string or JSON form (default llvm)")
    p.add_argument("--knobs", type=Path, help="knobs JSON (default: the heuristic plan)")
    p.add_argument("--out", type=Path, help="write the PlanBundle JSON here")
    p.add_argument("--show", type=Path, metavar="PLAN", help="print a saved plan readably")
    _logging_options(p, top=False)
    p.set_defaults(func=cmd_plan)

    t = sub.add_parser("tune", help="measure plans of a workload into a tuning database")
    _query_arguments(t)
    t.add_argument("--vnnlib", type=Path, help="with --onnx: tune the bound workload of this "
                   "property's branch-and-bound (--bab-batch sub-boxes, --bab-method), the "
                   "plan `verify --onnx --vnnlib --db` then runs")
    t.add_argument("--clip", type=_FINITE, nargs=2, metavar=("LO", "HI"),
                   help="clip the input box to [LO, HI]")
    _method(t, None, f"default crown-ibp; with --vnnlib, the whole-box bound before the "
            f"search, as verify's (default {DEFAULT_METHOD}), and --bab-method the search's")
    t.add_argument("--alpha-iterations", type=_COUNT, default=None,
                   help="with --vnnlib: optimisation steps of an alpha-crown whole-box bound, "
                   "as verify's (default 20)")
    t.add_argument("--dtype", choices=["float32", "float64"],
                   help="compute precision (default: the model's)")
    t.add_argument("--backend", default=None,
                   help="backends searched, comma-separated (default: all, torch,relax); the "
                   "default path of verify (torch) is always measured as the baseline")
    t.add_argument("--target", type=_target, default="llvm",
                   help="where the plans are measured and run: llvm (the CPU) or cuda (the "
                   "GPU: torch on it, or Relax compiled for it), string or JSON form (default "
                   "llvm); with --vnnlib also where the search's plans run")
    t.add_argument("--threads", type=_POSITIVE_INT, default=None,
                   help="threads per measuring worker (default: the machine's)")
    t.add_argument("--db", required=True, help="tuning database: a file or an SQLAlchemy URL")
    t.add_argument("--strategy", choices=["cpsat", "beam", "greedy", "random"],
                   default="cpsat", help="search strategy (default cpsat)")
    t.add_argument("--no-pretrained", action="store_true",
                   help="start the cost model cold, without the shipped training set")
    t.add_argument("--trials", type=_POSITIVE_INT, default=32,
                   help="plans measured for this workload in the database, in all (a rerun "
                   "continues to this many; default 32; with --vnnlib, for each of its "
                   "workloads)")
    t.add_argument("--seconds", type=_POSITIVE,
                   help="stop this run after about so many seconds (with --vnnlib, shared "
                   "by its workloads)")
    t.add_argument("--objective", default="time@width",
                   help="time, time@width (default: fastest at the default plan's tightness), "
                   "time@mem:BYTES, mix:A,B")
    t.add_argument("--batch-size", type=_POSITIVE_INT, default=8,
                   help="plans measured per round (default 8)")
    _measure_arguments(t, "plan")
    t.add_argument("--memory-limit", type=_POSITIVE_INT, metavar="MIB",
                   help="address-space cap per measured plan in MiB; a plan past it is "
                   "recorded as a memory failure (default: none)")
    t.add_argument("--seed", type=_COUNT, default=0, help="random seed (default 0)")
    _bab_arguments(t)
    _logging_options(t, top=False)
    t.set_defaults(func=cmd_tune)

    n = sub.add_parser("vnncomp", help="decide every instance of a VNN-COMP instances.csv "
                       "in one process")
    n.add_argument("--instances", type=Path, required=True,
                   help="a CSV of onnx,vnnlib,timeout[,expected] rows (paths relative to "
                   "--root)")
    n.add_argument("--root", type=Path, help="folder the paths are relative to (default: the "
                   "CSV's folder)")
    n.add_argument("--results", type=Path, help="write each VNN-COMP result file into this "
                   "folder")
    n.add_argument("--csv", type=Path, help="write one row per instance here")
    _method(n, DEFAULT_METHOD, f"of whole-box bounds without branch-and-bound; default "
            f"{DEFAULT_METHOD}")
    n.add_argument("--alpha-iterations", type=_COUNT, default=20,
                   help="optimisation steps of alpha-crown (default 20)")
    _backend(n, "torch")
    n.add_argument("--db", help="a tuning database with plans for the bound workloads")
    n.add_argument("--objective", default="time@width", help="which tuned plan to look up")
    _bab_arguments(n)
    _logging_options(n, top=False)
    n.set_defaults(func=cmd_vnncomp)

    c = sub.add_parser("costmodel", help="inspect the cost model in a tuning database, or "
                       "train the shipped one from one")
    c.add_argument("action", choices=["inspect", "train"],
                   help="inspect (quality, importances, dataset) or train (write the "
                   "training set the tuner starts from: --out, default the shipped one)")
    c.add_argument("--db", required=True, help="tuning database: a file or an SQLAlchemy URL")
    c.add_argument("--out", type=Path, help="train: where to write the training set "
                   "(default: boundflow/costmodel/data/pretrained.json.gz)")
    c.add_argument("--exclude", default="", help="train: workloads left out (keys or key "
                   "prefixes, comma-separated), e.g. to measure zero-shot ranking on them")
    c.add_argument("--workload", help="only this workload (a key or its prefix)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--plot", type=Path, help="write predicted vs measured and residuals here")
    _logging_options(c, top=False)
    c.set_defaults(func=cmd_costmodel)

    a = sub.add_parser("ablate", help="turn planner passes and knobs on and off, measured")
    _query_arguments(a)
    _method(a, "crown-ibp", "default crown-ibp")
    _backend(a, "relax")
    a.add_argument("--toggle", default="partition,fusion,domain,layout,forms,storage,cache,"
                   "lowering,schedule", help="comma-separated toggles (default: all)")
    a.add_argument("--config", type=Path, help="a JSON list of configurations instead")
    a.add_argument("--out", default="ablation",
                   help="directory for ablation.csv / .png (default ./ablation)")
    _measure_arguments(a, "configuration")
    _logging_options(a, top=False)
    a.set_defaults(func=cmd_ablate)

    d = sub.add_parser("db", help="show a tuning database, or move its records (JSON lines)")
    d.add_argument("action", choices=["show", "export", "import"], help="what to do")
    d.add_argument("--db", required=True,
                   help="an SQLite file or an SQLAlchemy URL (postgresql+psycopg://...)")
    d.add_argument("--file", default="-", help="export to / import from this file "
                   "(default: stdout / stdin)")
    d.add_argument("--workload", help="only this workload (a key or its prefix for show)")
    d.add_argument("--top", type=_POSITIVE_INT, default=5,
                   help="plans shown per workload (default 5)")
    d.add_argument("--objective", default="time@width",
                   help="which best-plan record `show` describes (default time@width)")
    _logging_options(d, top=False)
    d.set_defaults(func=cmd_db)
    return parser


def _print_error(e: BaseException) -> None:
    print(f"boundflow: error: {e}".replace("\n", " "), file=sys.stderr)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record comes (not when it was made)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if args.quiet else (
        logging.INFO if not args.verbose else logging.DEBUG)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("boundflow: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """The ``boundflow`` command: the exit status (0 done, 2 bad input or arguments, 130
    interrupted)."""
    start = _IMPORTED if argv is None else time.monotonic()    # as a command: from start-up
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:                        # --help, --version, argument errors
        return e.code if isinstance(e.code, int) else 2
    _configure_logging(args)
    args.argv, args.start = argv, start
    if hasattr(args, "no_progress"):
        args.no_progress = args.no_progress or args.quiet
    if args.command == "verify":
        args.method_given = args.method is not None
        args.method = args.method or DEFAULT_METHOD
    if (getattr(args, "threads", None) or 0) > MAX_THREADS:
        _print_error(BoundFlowError(f"--threads {args.threads}: at most {MAX_THREADS}"))
        return 2
    try:
        return args.func(args)
    except BoundFlowError as e:
        _print_error(e)
        return 2
    except (RecursionError, UnicodeDecodeError) as e:
        # a file or database row nested too deeply, or not text: input, whichever reader
        # met it (each reader names the problems it knows of)
        what = "nested too deeply to read" if isinstance(e, RecursionError) else \
            f"not UTF-8 text ({e.reason} at byte {e.start})"
        _print_error(BoundFlowError(f"an input of this command is {what}"))
        return 2
    except BrokenPipeError:                        # `boundflow verify ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:                      # Ctrl-C: what was recorded stays
        print(f"boundflow: interrupted ({args.command})", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
