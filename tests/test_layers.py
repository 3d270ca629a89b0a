"""The package's layers: imports only go down, there is no cycle, the host-side data
layer and the package root import no jax, and the public API stays what it was.

The order, lowest first (README, "Architecture"; ``lsgd_jax/__init__.py``):

    base | _version  <  data  <  rules | models | collectives | parallel  <  engine  <  training
          <  artifacts  <  cli  <  bench | study

A module may import modules of its own subpackage and of lower layers; subpackages of
one layer (the peers split by ``|``) do not import each other. The root
(``lsgd_jax/__init__.py``, ``__main__.py``) is above everything and nothing imports it.
Every import counts: top-level, deferred inside functions, and under TYPE_CHECKING.
"""

import ast
import json
import pathlib
import subprocess
import sys

import helpers
import pytest

ROOT = pathlib.Path(helpers.ROOT)
PACKAGE = ROOT / "lsgd_jax"
LAYERS = [
    {"base", "_version"},
    {"data"},
    {"rules", "models", "collectives", "parallel"},
    {"engine"},
    {"training"},
    {"artifacts"},
    {"cli"},
    {"bench", "study"},
]
RANK = {group: rank for rank, groups in enumerate(LAYERS) for group in groups}
# The public API: every name here stays importable from ``lsgd_jax``.
PUBLIC = {
    "ALLREDUCE_NAMES", "BatchLayout", "InFlight", "ModelFileError", "MomentumState", "Plan",
    "ResNet", "TrainConfig", "TrainState", "TrainStep", "create_train_state", "data_sharding",
    "default_weight_decay_mask", "get_allreduce", "get_model", "goyal_schedule", "goyal_sgd",
    "host_to_global", "initialize_distributed", "lars", "load_images", "load_model",
    "make_eval_step", "make_mesh", "make_plan", "make_train_step", "momentum_sgd", "normalize",
    "poly_schedule", "replicated_sharding", "scale_by_lars", "scaled_learning_rate",
    "state_sha256", "train_and_evaluate", "validate_batch_layout",
}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """The package modules ``name`` imports, anywhere in its file. ``from P import x``
    counts P (its ``__init__`` runs and is looked in), and P.x too when x is a module."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                here = here[:len(here) - node.level + 1]
                base = ".".join(here + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != "lsgd_jax":
                continue
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _group(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else None


def test_every_module_of_the_package_is_in_a_layer():
    loose = sorted(n for n in MODULES if _group(n) is not None and _group(n) not in RANK)
    assert not loose, f"modules outside every layer (add them to a layer): {loose}"


def test_imports_only_go_down():
    upward = []
    for name, targets in GRAPH.items():
        mine = _group(name)
        if mine is None:
            continue  # the root and __main__ sit above everything
        for target in targets:
            theirs = _group(target)
            if theirs is None:
                upward.append(f"{name} imports the package root ({target})")
            elif theirs != mine and RANK[theirs] >= RANK[mine]:
                upward.append(f"{name} ({mine}, layer {RANK[mine]}) imports {target} "
                              f"({theirs}, layer {RANK[theirs]})")
    assert not upward, "imports that do not go down:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(name):
        state[name] = 1
        stack.append(name)
        for target in sorted(GRAPH.get(name, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_each_subpackage_says_its_role_in_one_line():
    for group in sorted(RANK):
        init = PACKAGE / group / "__init__.py"
        if not init.exists():
            continue  # a module, not a package (_version)
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc and len(doc.splitlines()[0]) <= 100, f"{init}: no one-line role"


def _fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_root_and_the_data_layer_load_without_jax():
    got = _fresh("import json, sys; import lsgd_jax, lsgd_jax.data, lsgd_jax.data.workers, "
                 "lsgd_jax.data.sampler, lsgd_jax.data.augment; "
                 "print(json.dumps(sorted(m for m in ('jax', 'flax', 'orbax', 'optax', "
                 "'tensorflow') if m in sys.modules)))")
    assert got == []


def test_the_public_api_is_what_it_was():
    got = _fresh("import json, lsgd_jax; print(json.dumps({'all': sorted(lsgd_jax.__all__), "
                 "'missing': [n for n in lsgd_jax.__all__ if getattr(lsgd_jax, n, None) is None],"
                 " 'version': lsgd_jax.__version__}))")
    assert set(got["all"]) == PUBLIC and got["missing"] == []
    assert got["version"]


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_each_public_name_comes_from_its_layer(name):
    import lsgd_jax

    obj = getattr(lsgd_jax, name)
    module = getattr(obj, "__module__", None)
    if module:  # functions and classes: defined in a layer, re-exported by the root
        assert _group(module) in RANK, f"{name} is defined in {module}"


def _length(node) -> int:
    """A function's lines, its docstring not counted."""
    body = node.body
    doc = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
           and isinstance(body[0].value.value, str))
    start = body[0].end_lineno + 1 if doc and len(body) > 1 else node.lineno
    return node.end_lineno - start + 1


def test_no_function_is_over_80_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _length(node) > 80:
                long.append(f"{name}.{node.name}: {_length(node)} lines")
    assert not long, "split these:\n" + "\n".join(sorted(long))


def test_a_decoding_worker_and_its_forkserver_hold_no_jax():
    """The workers' forkserver preloads ``lsgd_jax.data.workers`` and forks each worker
    from itself: neither may have imported jax, flax, optax, orbax or TensorFlow."""
    code = """
import json, multiprocessing.forkserver as fs, sys
from lsgd_jax.data.workers import _context
ctx = _context()
queue = ctx.SimpleQueue()
probe = "import sys; q.put(sorted(m for m in HEAVY if m in sys.modules))"
heavy = ("jax", "flax", "optax", "orbax", "tensorflow")
proc = ctx.Process(target=exec, args=(probe, {"q": queue, "HEAVY": heavy}))
proc.start()
in_worker = queue.get()
proc.join()
with open(f"/proc/{fs._forkserver._forkserver_pid}/cmdline", "rb") as f:
    server = f.read().decode(errors="replace")
print(json.dumps({"worker": in_worker, "preload": "lsgd_jax.data.workers" in server,
                  "parent": sorted(m for m in heavy if m in sys.modules)}))
"""
    got = _fresh(code)
    assert got["preload"], "the forkserver no longer preloads lsgd_jax.data.workers"
    assert got["worker"] == [] and got["parent"] == [], got
