import pytest

from boundflow.errors import BoundFlowError
from boundflow.ir.task_graph import Buffer, PlanError, Task, TaskGraph


def buf(name, shape=(4,), **kw):
    return Buffer(name, kw.pop("node", name), shape, "float32", kw.pop("form", "lu"),
                  kw.pop("layout", tuple(range(len(shape)))), **kw)


def chain():
    tasks = (Task("input", "input", ("x",), (), ("x",)),
             Task("ibp:a", "ibp", ("a",), ("x",), ("a",)),
             Task("final", "final", (), ("a",), ("@bounds",)))
    return TaskGraph(tasks, (buf("x"), buf("a"), buf("@bounds", node="")), "@bounds")


def test_valid_graph_and_order():
    tg = chain().validate({"x": (4,), "a": (4,)}, "float32")
    assert tg.topological_order() == ["input", "ibp:a", "final"]
    assert tg.producer()["a"] == "ibp:a" and tg.readers()["a"] == ["final"]


def test_plan_error_is_a_boundflow_error():
    assert issubclass(PlanError, BoundFlowError)


@pytest.mark.parametrize("mutate, message", [
    (lambda tg: tg.replace(tasks=tg.tasks[:1] + (Task("ibp:a", "ibp", ("a",), ("zz",), ("a",)),)
                           + tg.tasks[2:]), "undeclared buffer 'zz'"),
    (lambda tg: tg.replace(tasks=tg.tasks + (Task("dup", "ibp", ("a",), ("x",), ("a",)),)),
     "written by 2 tasks"),
    (lambda tg: tg.replace(buffers=tg.buffers + (buf("b"),),
                           tasks=tg.tasks[:2] + (Task("ibp:b", "ibp", ("b",), ("x",), ("b",)),)
                           + tg.tasks[2:]), "dangling"),
    (lambda tg: tg.replace(tasks=(tg.tasks[0], tg.tasks[2], tg.tasks[1])), "before task"),
    (lambda tg: tg.replace(tasks=tg.tasks[:1] + (Task("ibp:a", "bogus", ("a",), ("x",), ("a",)),)
                           + tg.tasks[2:]), "unknown kind"),
    (lambda tg: tg.replace(buffers=(buf("x"), buf("a", layout=(1,)), buf("@bounds", node=""))),
     "not a permutation"),
    (lambda tg: tg.replace(buffers=(buf("x"), buf("a", form="xy"), buf("@bounds", node=""))),
     "unknown form"),
    (lambda tg: tg.replace(buffers=(buf("x"), buf("a", alias_of="x", shape=(5,)),
                                    buf("@bounds", node=""))), "another size"),
])
def test_validation_names_the_problem(mutate, message):
    with pytest.raises(PlanError, match=message):
        mutate(chain()).validate()


def test_shape_and_dtype_mismatch():
    with pytest.raises(PlanError, match="shape"):
        chain().validate({"x": (4,), "a": (5,)})
    with pytest.raises(PlanError, match="dtype"):
        chain().validate(None, "float64")


def test_cycle_is_reported():
    tasks = (Task("input", "input", ("x",), (), ("x",)),
             Task("p", "ibp", ("a",), ("x", "b"), ("a",)),
             Task("q", "ibp", ("b",), ("a",), ("b",)),
             Task("final", "final", (), ("b",), ("@bounds",)))
    tg = TaskGraph(tasks, (buf("x"), buf("a"), buf("b"), buf("@bounds", node="")), "@bounds")
    with pytest.raises(PlanError, match="cycle"):
        tg.topological_order()
