"""The rules of the house: the dashboard and the CLI never import torch; no module imports one from
a layer above its own; no import circle (type-only imports included); and no module reads or writes
another module's private attributes (state has one owner).

The first rule is what lets the dashboard and `python -m babysit status|set|...` start fast and
stay out of the trainer's memory (babysit/__init__.py loads Run lazily for that reason). It is
checked the only way that cannot be fooled by a lazy import: a fresh interpreter runs the code and
looks at ``sys.modules``. The second is read from the source with ``ast``: every import of a babysit
module, at the top of a file or inside a function (only ``if TYPE_CHECKING:`` blocks, which never
run, are left out).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "babysit"

# -- the layers, lowest first ----------------------------------------------------------------------
# A module may import modules of its own layer or of a lower one, never of a higher one. A package
# named here (store, jobs, ui) places its modules with it. A new module must be placed here (the
# test says so), which is the moment to decide where it belongs.
LAYERS: dict[str, tuple[str, ...]] = {
    # Plain Python: values, paths, signals, the exception tree; no babysit imports but each other.
    "foundations": ("errors", "commands", "rundir", "signals", "serving", "downsample"),
    # What is on disk and how an optimizer or a loss is read: the run store, checkpoints; and the
    # panda's instruments' readings of a run (hints, probe and sweep results, journals, comparisons).
    "records": ("store", "checkpoint", "dcp_folder", "sharded", "arrivals", "sharded_writer", "parallelism", "optim",
                "optimizer_set", "guard", "guard_watch", "instruments", "retention", "cadence"),
    # The trainer side: the Run and the pieces it is made of. `babysit` itself is the public face
    # of Run (its names load from here).
    "trainer": ("user_state", "control", "loader_skip", "position", "trainables", "ranks", "snapshots", "hparam_watch",
                "remedy", "writer", "narrator", "resume", "excursion_runner", "command_runner", "cuts", "journal_replay",
                "run_settings", "run",
                "babysit"),
    # Training jobs and framework adapters written against the public API.
    "jobs": ("jobs", "seeding", "lightning", "hf", "hf_state"),
    # What a person runs: the CLI and the dashboard.
    "faces": ("cli", "probes_text", "__main__", "ui"),
}
LAYER_NAMES = list(LAYERS)
_PLACED = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}


def layer_of(module: str) -> int | None:
    """The layer of ``module`` ("ui.page"): its own entry, else that of the package it is in."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        rank = _PLACED.get(".".join(parts[:end]))
        if rank is not None:
            return rank
    return None


def dashboard_may_import(module: str) -> bool:
    """The dashboard reads run directories only: the foundations, the store, the instruments'
    readings and its own modules; nothing of the trainer side or the jobs (and so no torch)."""
    return layer_of(module) == 0 or module.split(".")[0] in ("store", "instruments", "ui")


def module_name(path: Path) -> str:
    """babysit/ui/page.py -> "ui.page"; babysit/__init__.py -> "babysit"; babysit/jobs/__init__.py -> "jobs"."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "babysit"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, package: list[str], *, type_only: bool = False) -> set[str]:
    """The babysit modules (as LAYERS names them) that the code in ``tree`` imports when it runs
    (``type_only``: and those its ``if TYPE_CHECKING:`` blocks name)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not type_only:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "babysit" or alias.name.startswith("babysit."):
                    found.add(_known(alias.name.split(".")[1:]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
            elif node.module and (node.module == "babysit" or node.module.startswith("babysit.")):
                base = []
                node = ast.ImportFrom(module=".".join(node.module.split(".")[1:]) or None, names=node.names, level=1)
            else:
                base = None
            if base is not None:
                target = base + (node.module.split(".") if node.module else [])
                for alias in node.names:
                    # `from . import commands` and `from .ui import page` name modules; `from .store
                    # import RunStore` names a thing in one.
                    as_module = target + [alias.name]
                    found.add(_known(as_module) if _is_module(as_module) else _known(target))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _known(parts: list[str]) -> str:
    return ".".join(parts) if parts else "babysit"


def _is_module(parts: list[str]) -> bool:
    """Whether babysit/<parts> is a module or a package (so `from . import x` names a module)."""
    path = PACKAGE.joinpath(*parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() or ".".join(parts) in _PLACED


def babysit_modules(*, type_only: bool = False) -> dict[str, set[str]]:
    """Every module of the package and the babysit modules it imports (``type_only``: for type hints too)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        package = name.split(".") if path.name == "__init__.py" and name != "babysit" else name.split(".")[:-1]
        graph[name] = _imports(ast.parse(path.read_text(), str(path)), package, type_only=type_only) - {name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of ``graph`` (its strongly connected components of more than one module).
    A package's ``__init__`` re-exporting its own modules is not a circle of rooms: a module's
    import of its own package (``cli.parser`` importing ``cli``) is left out."""
    edges = {m: {d for d in deps if d in graph and not m.startswith(d + ".")} for m, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for dep in sorted(edges[module]):
            if dep not in index:
                connect(dep)
                low[module] = min(low[module], low[dep])
            elif dep in stack:
                low[module] = min(low[module], index[dep])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            connect(module)
    return circles


def private_accesses(files: dict[str, str]) -> list[str]:
    """Reads and writes of another module's private attributes: ``x._name`` (not ``self``/``cls``)
    where ``_name`` is defined in another of ``files`` ({module: source}) and not in this one.
    Other packages' privates (Lightning's loop internals, torch.distributed's) are theirs to keep
    stable and are not counted."""
    trees = {module: ast.parse(source) for module, source in files.items()}
    defined: dict[str, set[str]] = {}
    for module, tree in trees.items():
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
        defined[module] = {n for n in names if n.startswith("_") and not n.startswith("__")}
    found = []
    for module, tree in trees.items():
        elsewhere = set().union(*(names for other, names in defined.items() if other != module)) - defined[module]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in elsewhere
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"babysit/{module}:{node.lineno}: {ast.unparse(node)}")
    return found


def _package_sources() -> dict[str, str]:
    return {str(path.relative_to(PACKAGE)): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_touches_another_modules_private_attributes() -> None:
    assert private_accesses(_package_sources()) == []


def test_the_private_access_count_can_fail() -> None:
    files = {"run.py": "class Run:\n    def __init__(self):\n        self._interrupt = None\n",
             "remedy.py": "def apply(run):\n    run._interrupt = 'stop'\n    run.interrupt_ok = 1\n"}
    assert private_accesses(files) == ["babysit/remedy.py:2: run._interrupt"]


def test_no_import_circle_even_through_type_hints() -> None:
    assert import_circles(babysit_modules(type_only=True)) == []


def test_the_circle_finder_finds_a_circle() -> None:
    graph = {"run": {"command_runner"}, "command_runner": {"excursion_runner"}, "excursion_runner": {"run"},
             "store": set(), "cli": {"cli.parser"}, "cli.parser": {"cli"}}
    assert import_circles(graph) == [["command_runner", "excursion_runner", "run"]]


def test_the_import_reader_sees_relative_absolute_nested_and_type_only_imports() -> None:
    code = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import babysit\n"
        "from . import commands as cmd\n"
        "from .store import RunStore\n"
        "from babysit.jobs.common import build_optimizer\n"
        "def later():\n"
        "    from .run import Run\n"
        "if TYPE_CHECKING:\n"
        "    from .snapshots import Snapshots\n"
    )
    assert _imports(ast.parse(code), []) == {"babysit", "commands", "store", "jobs.common", "run"}
    assert _imports(ast.parse("from ..store import RunStore\nfrom .data import read_view\n"), ["ui"]) == {
        "store", "ui.data"}


def test_every_module_has_a_layer() -> None:
    graph = babysit_modules()
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"place these modules in a layer of tests/test_layers.py LAYERS: {unplaced}"
    imported_unknown = sorted({m for deps in graph.values() for m in deps if layer_of(m) is None})
    assert not imported_unknown, f"imports of modules that are not in LAYERS: {imported_unknown}"


def test_no_module_imports_one_from_a_higher_layer() -> None:
    upward = [
        f"babysit/{module} ({LAYER_NAMES[layer_of(module)]}) imports {dep} ({LAYER_NAMES[layer_of(dep)]})"
        for module, deps in sorted(babysit_modules().items()) if layer_of(module) is not None
        for dep in sorted(deps) if layer_of(dep) is not None and layer_of(dep) > layer_of(module)
    ]
    assert upward == []


def test_the_dashboard_modules_import_nothing_of_the_trainer_side() -> None:
    graph = babysit_modules()
    reached = {m: sorted(d for d in deps if not dashboard_may_import(d)) for m, deps in graph.items()
               if m.split(".")[0] == "ui"}
    assert {m: deps for m, deps in reached.items() if deps} == {}
    app = _imports(ast.parse((REPO / "app.py").read_text()), [])
    assert app and all(dashboard_may_import(m) for m in app), app


def test_the_layer_check_fails_on_an_upward_import() -> None:
    """The rule can fail: a store that imported the Run, or a page that imported a job, is caught."""
    assert [d for d in _imports(ast.parse("from ..run import Run\n"), ["store"]) if layer_of(d) > layer_of("store")] \
        == ["run"]
    assert [d for d in _imports(ast.parse("from ..jobs import digits\n"), ["ui"]) if not dashboard_may_import(d)] \
        == ["jobs.digits"]


# -- torch stays out of the CLI and the dashboard ------------------------------------------------
NO_TORCH = r"""
import json, os, socket, sys, time
from pathlib import Path

run_dir, app = Path(sys.argv[1]), sys.argv[2]
# A run that a live trainer (this process, as far as the store can tell) is training, with a curve.
import numpy as np
from babysit.store import PER_STEP, RunStore
store = RunStore(run_dir, create=True)
branch = store.new_branch(parent=None, from_checkpoint=None, start_step=0, start_epoch=0)
store.write_status(state="running", pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                   heartbeat=time.time(), epoch=1, max_epochs=3, step=50, step_in_epoch=50, steps_per_epoch=100,
                   branch=branch, lr=0.05, momentum=0.9, optimizer="SGD", message="")
steps = np.arange(1, 51)
store.write_chunks([(store.series_id("loss", branch, PER_STEP), steps, np.linspace(2.0, 1.0, 50), 1.7e9 + steps)])

def torch_modules():
    return sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))

seen = {"torch at start": torch_modules()}
from babysit import cli
for argv in (["status", "--run-dir", str(run_dir)], ["status", "--run-dir", str(run_dir), "--json"],
             ["set", "lr", "0.02", "--run-dir", str(run_dir)], ["pause", "--run-dir", str(run_dir)]):
    seen[" ".join(argv)] = cli.main(argv)
seen["queued"] = [c["kind"] for c in store.commands()]
seen["torch after the CLI"] = torch_modules()

from streamlit.testing.v1 import AppTest
sys.argv = ["app.py", "--root", str(run_dir.parent), "--run", str(run_dir)]
at = AppTest.from_file(app, default_timeout=120)
at.run()
seen["page errors"] = [str(e.value) for e in at.exception]
seen["page metrics"] = {m.label: m.value for m in at.metric}
seen["torch after the dashboard"] = torch_modules()
# And the look sees torch when something does load it: the Run, which the trainer imports.
import babysit
babysit.Run
seen["torch after the Run"] = "torch" in sys.modules
print("RESULT " + json.dumps(seen))
"""


def test_the_cli_and_the_dashboard_never_import_torch(tmp_path: Path) -> None:
    """In a fresh interpreter: four CLI commands, then the whole page drawn once, and no torch."""
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(run_dir), str(REPO / "app.py")],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    seen = json.loads(result.stdout.rsplit("RESULT ", 1)[1])
    # The commands ran (a status twice, a nudge and a pause queued) and the page drew the run:
    # the check below means something only if the code that could pull torch in really ran.
    d = f"--run-dir {run_dir}"
    assert [seen[f"status {d}"], seen[f"status {d} --json"], seen[f"set lr 0.02 {d}"], seen[f"pause {d}"]] == [0] * 4
    assert seen["queued"] == ["set_lr", "pause"], seen
    assert seen["page errors"] == [] and seen["page metrics"]["step"] == "50", seen
    assert seen["torch at start"] == [], seen
    assert seen["torch after the CLI"] == [], seen["torch after the CLI"][:5]
    assert seen["torch after the dashboard"] == [], seen["torch after the dashboard"][:5]
    assert seen["torch after the Run"] is True
