"""The public surface of ``layerlens_jax``: its names, their docstrings, what importing it pulls in,
and the shape of the package's import graph."""

from __future__ import annotations

import ast
import inspect
import json
import pathlib
import subprocess
import sys

import layerlens_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "layerlens_jax"

# Changing the public API is a deliberate act: edit this list together with layerlens_jax.__all__.
PUBLIC_API = [
    "Adapter", "BASE_FILTER", "BertClassifier", "BertConfig", "Catalogue", "CheckpointError",
    "CostModel", "GainModel", "GradientSpectra", "KINDS", "LayerStats", "LinenBertClassifier",
    "LoRA", "PEFT_FILTER", "PeftParam", "Plan", "Prefix", "ProbeResult", "ProfileStep", "Site",
    "SiteAllocation", "SpectralGain", "StepProfile", "UtilityConfig", "UtilityReport", "allocate",
    "allocate_curve", "allocate_exact", "apply_plan", "calibrate_latency", "count_trainable",
    "discover_sites", "gradient_spectra", "init_adapters", "linen_variables", "load_plan",
    "lora_ranks", "make_functional_train_step", "make_linen_train_step", "make_optimizer",
    "make_train_step", "measure_step_profile", "merge", "merged_utility", "plan_metrics",
    "probe_utility", "profile", "reallocate_plan", "register_site_kind", "resize_lora",
    "restore_adapters", "sampled_label_loss", "save_adapters", "save_plan", "site_kind_of",
    "stack_train_states", "to_peft_config", "transfer_optimizer_state", "unstack_train_state",
    "utility", "utility_report",
]

# Importing the core must not pull in the application or its extras.
FORBIDDEN_ON_IMPORT = ("layerlens_jax.app", "matplotlib", "tokenizers", "safetensors")


def test_all_is_the_pinned_list():
    assert PUBLIC_API == sorted(PUBLIC_API)
    assert len(set(layerlens_jax.__all__)) == len(layerlens_jax.__all__), "duplicates in __all__"
    assert sorted(layerlens_jax.__all__) == PUBLIC_API


def _own_docstring(obj) -> str | None:
    """The object's own docstring: not inherited, not the signature dataclasses make up."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    name = getattr(obj, "__name__", "")
    if not doc or not doc.strip() or doc.startswith(f"{name}("):
        return None
    return doc


def _documented_constants() -> set[str]:
    """Module-level names assigned right after a ``#:`` comment (Sphinx's attribute docstring)."""
    names = set()
    for path in PACKAGE_DIR.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.parse("\n".join(lines)).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.lineno >= 2 \
                    and lines[node.lineno - 2].lstrip().startswith("#:"):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_every_public_name_resolves_and_is_documented():
    constants = _documented_constants()
    undocumented = []
    for name in layerlens_jax.__all__:
        obj = getattr(layerlens_jax, name)  # AttributeError names the culprit
        if inspect.isclass(obj) or inspect.isroutine(obj):
            if _own_docstring(obj) is None:
                undocumented.append(name)
        elif name not in constants:
            undocumented.append(name)
    assert not undocumented, f"public names without a docstring (or a '#:' comment): {undocumented}"


def test_the_docstring_check_can_fail():
    import dataclasses

    @dataclasses.dataclass
    class Bare:
        x: int

    class Child(layerlens_jax.LayerStats):
        pass

    assert _own_docstring(Bare) is None  # dataclasses invent "Bare(x: int)"
    assert _own_docstring(Child) is None  # inherited docstrings do not count
    assert _own_docstring(lambda: 0) is None
    assert _own_docstring(layerlens_jax.profile) is not None
    assert "KINDS" in _documented_constants() and "PUBLIC_API" not in _documented_constants()


def test_import_does_not_pull_in_the_app_or_its_extras():
    code = ("import json, sys, layerlens_jax; "
            "print(json.dumps([layerlens_jax.__file__, sorted(sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    where, modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert pathlib.Path(where).resolve().is_relative_to(PACKAGE_DIR)
    assert "layerlens_jax._src.profile" in modules  # the probe sees the package's own imports
    pulled = [m for m in modules
              if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_ON_IMPORT)]
    assert not pulled, f"import layerlens_jax imports {pulled}"


# ------------------------------------------------------------------------------ import graph


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_statements(body, deferred: bool):
    """The import statements of a module, never those under ``if TYPE_CHECKING:``; those inside
    function bodies (run on call, not on import) only when ``deferred``."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if deferred:
                yield from _import_statements(node.body, deferred)
        elif isinstance(node, ast.If):
            if ast.unparse(node.test) not in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                yield from _import_statements(node.body, deferred)
            yield from _import_statements(node.orelse, deferred)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse,
                          node.finalbody):
                yield from _import_statements(block, deferred)
        elif isinstance(node, (ast.With, ast.ClassDef, ast.For, ast.While)):
            yield from _import_statements(node.body, deferred)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def import_graph(package_dir: pathlib.Path, *, deferred: bool = False) -> dict[str, set[str]]:
    """``{module: {intra-package modules it imports}}`` for a package directory: at import time
    (module level), or with ``deferred`` also the imports inside functions."""
    root = package_dir.parent
    files = {_module_name(p, root): p for p in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in _import_statements(ast.parse(path.read_text()).body, deferred):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    known = [".".join(parts[:i]) for i in range(len(parts), 0, -1)
                             if ".".join(parts[:i]) in files]
                    edges.update(known[:1])
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in files:
                        edges.add(sub)
                    elif source in files:
                        edges.add(source)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_graph_builder_finds_cycles_and_ignores_deferred_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.a import f\nfrom pkg.sub import d\n",
        "a.py": "from . import b\nimport numpy\ndef f():\n    from pkg import c\n",
        "b.py": "import pkg.sub\nimport pkg.a\n",
        "c.py": ("import typing\nif typing.TYPE_CHECKING:\n    from pkg import a\n"
                 "from pkg import b\n"),
        "sub/__init__.py": "",
        "sub/d.py": ("from .. import c\ntry:\n    from ..a import f\n"
                     "except ImportError:\n    pass\n"),
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    graph = import_graph(pkg)
    assert graph == {"pkg": {"pkg.a", "pkg.sub.d"}, "pkg.a": {"pkg.b"},
                     "pkg.b": {"pkg.sub", "pkg.a"}, "pkg.c": {"pkg.b"}, "pkg.sub": set(), "pkg.sub.d": {"pkg.c", "pkg.a"}}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
    assert import_graph(pkg, deferred=True)["pkg.a"] == {"pkg.b", "pkg.c"}
    graph["pkg.sub"] = {"pkg.sub.d"}  # a → b → sub → sub.d → a, and sub.d → c → b: one circle
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.sub", "pkg.sub.d"]]


def test_package_import_graph_is_acyclic():
    graph = import_graph(PACKAGE_DIR)
    assert {"layerlens_jax", "layerlens_jax._src.profile", "layerlens_jax.app.cli"} <= set(graph)
    assert "layerlens_jax._src.sites" in graph["layerlens_jax._src.profile"]
    found = cycles(graph)
    assert not found, f"import circles (modules importing each other at import time): {found}"


def test_no_circle_even_through_imports_deferred_into_functions():
    """A circle hidden by a function-level import is still a circle in the design (two modules
    that need each other): shared names belong in a lower module both import."""
    found = cycles(import_graph(PACKAGE_DIR, deferred=True))
    assert not found, f"import circles through deferred imports: {found}"


def test_the_core_never_imports_the_app():
    graph = import_graph(PACKAGE_DIR, deferred=True)
    up = {m: sorted(t for t in targets if t.startswith("layerlens_jax.app"))
          for m, targets in graph.items() if not m.startswith("layerlens_jax.app")}
    up = {m: t for m, t in up.items() if t}
    assert not up, f"core modules importing the application: {up}"
