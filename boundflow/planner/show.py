"""A readable account of a PlanBundle (``boundflow plan --show``)."""

from __future__ import annotations

from boundflow.ir.plan import PlanBundle


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe(bundle: PlanBundle, batch: int | None = None) -> str:
    w, tg, sp = bundle.workload, bundle.task_graph, bundle.storage_plan
    batch = batch or w.batch
    lines = [
        f"plan {bundle.key}  (schema {bundle.schema_version})",
        f"workload {w.key}: input {list(w.input_shape)} batch {w.batch}, "
        f"{w.n_specs or 'no'} specs, method {w.method}, {w.dtype}, target {w.target}",
        f"knobs {bundle.knobs.key}",
        "",
        "domains: " + ", ".join(f"{n}={d}" for n, d in bundle.domain_plan.intermediate)
        + f"; final {bundle.domain_plan.final}",
        "CROWN tightens: " + (", ".join(bundle.domain_plan.crown_nodes) or "nothing"),
    ]
    lp = bundle.layout_plan
    for region, layout in lp.regions:
        lines.append(f"region {layout}: {', '.join(region)}")
    if lp.views:
        lines.append("views (no data moved): " + ", ".join(lp.views))
    for r in lp.rewrites:
        lines.append(f"rewrite: {r}")
    lines += ["", f"{'task':<28} {'kind':<7} {'lowering':<8} {'nodes':<36} reads -> writes"]
    low = {t: (lo, s) for t, lo, s in bundle.lowering_plan.tasks}
    for t in tg.tasks:
        nodes = ",".join(t.nodes)
        nodes = nodes if len(nodes) <= 36 else nodes[:33] + "..."
        lowering = low.get(t.name, ("-", ()))[0]
        extra = f" {dict(t.attrs)}" if t.kind in ("final", "layout") else ""
        lines.append(f"{t.name:<28} {t.kind:<7} {lowering:<8} {nodes:<36} "
                     f"{', '.join(t.inputs) or '-'} -> {', '.join(t.outputs)}{extra}")
    live = {b: (f, l) for b, f, l in sp.liveness}
    slot = dict(sp.assignment)
    lines += ["", f"{'buffer':<28} {'shape':<16} {'form':<4} {'layout':<10} {'live':<8} "
              f"{'slot':<5} bytes/sample"]
    for b in tg.buffers:
        where = (f"={b.alias_of}" if b.alias_of else
                 str(slot[b.name]) if b.name in slot else "caller")
        span = "%d..%d" % live[b.name] if b.name in live else "-"
        ip = " in place" if b.name in sp.inplace else ""
        lines.append(f"{b.name:<28} {str(list(b.shape)):<16} {b.form:<4} "
                     f"{str(b.layout):<10} {span:<8} {where:<5} {b.bytes_per_sample}{ip}")
    lines += ["", f"storage: {'reuse' if sp.reuse else 'no reuse'}, {len(sp.slots)} slots; "
              f"planned peak {_bytes(sp.planned_bytes * batch)} at batch {batch} "
              f"(every buffer its own: {_bytes(sp.unshared_bytes * batch)})"]
    scopes = {}
    for e in bundle.cache_plan.entries:
        scopes.setdefault(e.scope, []).append(e.task)
    for scope, tasks in sorted(scopes.items()):
        lines.append(f"cache {scope}: {', '.join(tasks)}")
    return "\n".join(lines)
