"""The package's layers: no import cycle (module- or function-level), every module imports on its own in a fresh
interpreter, library modules never import a stage, and the stage registry is explicit and clash-free."""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import longalign_lib

PKG = Path(longalign_lib.__file__).resolve().parent
ROOT = PKG.parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module → package modules it imports anywhere in its code (top level, functions, `if __name__` blocks)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        base = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    prefix = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [prefix, *(f"{prefix}.{a.name}" for a in node.names)]
            graph[m].update(t for t in targets if t in mods and t != m and t != "longalign_lib")
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_library_never_imports_a_stage():
    graph = import_graph()
    top = {"longalign_lib.cli", "longalign_lib.pipeline", "longalign_lib.docs_reference"}
    bad = {m: sorted(t for t in deps if t.startswith("longalign_lib.stages"))
           for m, deps in graph.items() if not m.startswith("longalign_lib.stages") and m not in top}
    assert {m: d for m, d in bad.items() if d} == {}


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_imports_in_a_fresh_interpreter(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


def test_registry_is_in_recipe_order_and_typed():
    from longalign_lib.stages import NAMES, STAGES, StageResult, get

    assert NAMES == ("check", "corpus", "synth", "tokenize", "analyze", "pack", "train", "eval", "judge", "needle")
    for s in STAGES:
        assert s.run.__module__ == f"longalign_lib.stages.{s.name}" and s.help
        assert get(s.name) is s
    assert StageResult.from_dict(StageResult({"a": 1}, ["x"], "r").to_dict()) == StageResult({"a": 1}, ["x"], "r")


def test_run_rejects_a_clashing_stage_flag():
    from longalign_lib.cli import add_stage_flags
    from longalign_lib.stages import Stage, StageResult

    def a(p):
        p.add_argument("--limit", type=int, default=1, help="one thing")

    def b(p):
        p.add_argument("--limit", type=int, default=2, help="another thing")

    noop = lambda cfg, run_dir, args: StageResult()  # noqa: E731
    with pytest.raises(ValueError, match=r"--limit of stage 'b' clashes with the one of 'a'"):
        add_stage_flags(argparse.ArgumentParser(), (Stage("a", "", noop, a), Stage("b", "", noop, b)))
    p = argparse.ArgumentParser()
    p.add_argument("--force", action="store_true")
    with pytest.raises(ValueError, match="--force"):
        add_stage_flags(p, (Stage("a", "", noop, lambda q: q.add_argument("--force", type=int)),))
    # one shared definition (synth and train both resume) is one flag owned by the first stage
    owners = add_stage_flags(argparse.ArgumentParser())
    assert owners["--resume"] == "synth" and owners["--eval-fresh"] == "eval"


def test_eval_flags_exist_and_parse():
    from longalign_lib.cli import build_parser

    a = build_parser().parse_args(["eval", "--bench", "b.jsonl", "--eval-limit", "3", "--eval-fresh"])
    assert (a.bench, a.eval_limit, a.eval_fresh) == ("b.jsonl", 3, True)
    a = build_parser().parse_args(["run", "--resume", "--eval-fresh"])
    assert a.resume and a.eval_fresh
