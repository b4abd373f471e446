"""The CLI contract: every flag the docs, the modules' "Run as:" lines and the error messages name exists."""
from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from longalign_lib.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "longalign_lib"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
COMMAND = re.compile(r"(?:\blongalign|python3? -m longalign_lib\.cli) (\w+)((?:[ \t]+(?:\[[^\]\n]*\]|[^\s`'\"|;)]+))*)")
# another program's flags: a quoted command (`pip install --no-deps x`) or a launcher named in the text
OTHER_PROGRAM = re.compile(r"`(?!longalign\b)[A-Za-z][^`]*`"
                           r"|\b(?:torchrun|accelerate launch|pip install|huggingface-cli)\b[^`()\n]*")
MODULE_RUN = re.compile(r"python3? -m (longalign_lib(?:\.(?!cli\b)\w+)+)((?:[ \t]+(?:\[[^\]\n]*\]|[^\s`'\"|;)]+))*)")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    ap = build_parser()
    action = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {o for a in p._actions for o in a.option_strings}


def _texts() -> list[tuple[str, str]]:
    """(where, text): module docstrings, string constants of the code (error messages), docs, README."""
    out = []
    for f in sorted(PKG.rglob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append((f"{f.relative_to(ROOT)}:{node.lineno}", node.value))
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*.py")),
              *sorted((ROOT / "bench").glob("*.sh")), ROOT / "Makefile"]:
        if f.exists():
            out.append((str(f.relative_to(ROOT)), f.read_text(encoding="utf-8")))
    return out


def stage_commands() -> list[tuple[str, str, list[str]]]:
    """(where, subcommand, flags) of every `longalign <subcommand> ...` written anywhere."""
    found = []
    for where, text in _texts():
        for m in COMMAND.finditer(text):
            found.append((where, m.group(1), FLAG.findall(m.group(2))))
    return found


def test_finds_the_commands_it_checks():
    cmds = stage_commands()
    assert any(s == "eval" and "--eval-fresh" in f for _, s, f in cmds)  # generate.py's message, stages/eval.py
    assert any(s == "run" and "--force" in f for _, s, f in cmds)
    assert len({s for _, s, _ in cmds}) >= 10


def test_every_flag_of_a_longalign_command_exists():
    subs = _subparsers()
    bad = []
    for where, stage, flags in stage_commands():
        if stage not in subs:
            if stage in {"<stage>", "stage"} or not flags:
                continue
            bad.append(f"{where}: `longalign {stage}`: no such subcommand")
            continue
        known = _options(subs[stage])
        bad += [f"{where}: `longalign {stage} {f}`: no such flag" for f in flags if f not in known]
    assert not bad, "\n".join(bad)


def test_every_flag_an_error_message_names_exists():
    """A `--flag` in a string of the package (an error message, a help text, a hint) is a flag of a `longalign`
    subcommand, unless it sits in a quoted command of another program (`pip install --no-deps ...`)."""
    known = set().union(*(_options(p) for p in _subparsers().values()))
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        skip = set()
        for n in ast.walk(tree):
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body and \
                    isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant):
                skip.add(id(n.body[0].value))  # docstrings: their "Run as:" lines are checked above
            if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_argument":
                skip.update(id(a) for a in n.args)  # a flag's own definition
        strings = []
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):  # an f-string is one message: its pieces are read together
                skip.update(id(v) for v in node.values)
                strings.append((node, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.append((node, node.value))
        for node, text in strings:
            if id(node) in skip:
                continue
            for flag in FLAG.findall(OTHER_PROGRAM.sub("", text)):
                if flag not in known:
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno}: {flag} in {text[:80]!r}")
    assert not bad, "\n".join(bad)


def _module_runs() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for _, text in _texts():
        for m in MODULE_RUN.finditer(text):
            out.setdefault(m.group(1), set()).update(FLAG.findall(m.group(2)))
    return out


@pytest.mark.parametrize("module", sorted(_module_runs()))
def test_every_flag_of_a_python_m_line_exists(module):
    flags = _module_runs()[module]
    if not flags:
        pytest.skip(f"{module}: run without flags")
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    missing = sorted(f for f in flags if f not in set(FLAG.findall(r.stdout)))
    assert not missing, f"python -m {module}: {missing} not in its --help"


SETTING = re.compile(r"`(?:--set )?(model|corpus|synth|data|batching|train|eval)\.([a-z][a-z0-9_]*\*?)")


def test_every_setting_the_docs_name_exists():
    """`section.key` in backticks in README and docs/*.md is a real setting (module names and files excepted), and
    a wildcard next to named settings (`synth.max_retries` ... (and `eval.judge_*`)) promises those same keys under
    its prefix. Fails on a7eda25: howto.md promised eval.judge_max_retries / eval.judge_timeout_s."""
    import importlib
    import importlib.util

    from longalign_lib.config import load_config

    d = load_config("cpu-demo", []).to_dict()
    missing = []
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            named, wild = [], []
            for sec, key in SETTING.findall(line):
                if key.endswith("*"):
                    wild.append((sec, key[:-1]))
                elif key not in d[sec] and key not in ("json", "jsonl", "py", "yaml", "safetensors") \
                        and not (importlib.util.find_spec(f"longalign_lib.{sec}")
                                 and hasattr(importlib.import_module(f"longalign_lib.{sec}"), key)):
                    missing.append(f"{f.name}:{n}: {sec}.{key}")
                elif key in d[sec]:
                    named.append(key)
            missing += [f"{f.name}:{n}: {sec}.{prefix}{key} (promised by {sec}.{prefix}*)"
                        for sec, prefix in wild for key in named if prefix + key not in d[sec]]
    assert not missing, missing
