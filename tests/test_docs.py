"""The user documentation stays true to the code.

- README.md's config reference (between the marker comments) is exactly
  ``configurator.markdown_reference()``, so a new or changed key cannot go undocumented;
- every ``python -m X`` / ``python X.py`` / ``torchrun ... X.py`` named in a fenced code block of
  README.md or README_zh.md exists and answers ``--help`` with exit status 0;
- both READMEs list the same commands (module and script names), so the Chinese walkthrough
  cannot fall behind the English one;
- relative links in the READMEs and docs/ point at files that exist.

After changing a config key, regenerate the reference block with::

    python tests/test_docs.py --update
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_ZH = ROOT / "README_zh.md"
READMES = (README, README_ZH)
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"

# Scripts named in the READMEs that take no --help, and why (checked for existence only).
NO_HELP = {
    "configurator.py": "its only argument selects the output (none: key help; any: the Markdown table)",
}

FENCED_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")
LAUNCHERS = ("python", "torchrun", "make")


def reference_block() -> str:
    """What belongs between the markers: the generated table on its own lines."""
    sys.path.insert(0, str(ROOT))
    from configurator import markdown_reference

    return f"\n{markdown_reference()}\n"


def with_reference(text: str) -> str:
    """``text`` with its config-reference block replaced by the current one."""
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}{reference_block()}{END}{tail}"


def command_lines(text: str) -> list[list[str]]:
    """Words of every fenced-code line that runs python, torchrun or make (env prefixes dropped)."""
    commands = []
    for block in FENCED_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = line.split()
            while words and ENV_ASSIGNMENT.match(words[0]):
                words = words[1:]
            if words and words[0] in LAUNCHERS:
                commands.append(words)
    return commands


def command_name(words: list[str]) -> tuple[str, str]:
    """(launcher, module or script): ('python -m', 'data.x'), ('torchrun', 'train.py'), ('make', 'demo')."""
    launcher, args = words[0], words[1:]
    if launcher == "make":
        return "make", args[0] if args else ""
    if launcher == "python" and len(args) >= 2 and args[0] == "-m":
        return "python -m", args[1]
    script = next((a for a in args if a.endswith(".py")), "")
    return launcher, script


def readme_commands(path: Path) -> set[tuple[str, str]]:
    return {command_name(words) for words in command_lines(path.read_text(encoding="utf-8"))}


def runnable_targets() -> list[tuple[str, str]]:
    """('module', name) / ('script', path) for every python or torchrun command in both READMEs."""
    targets = set()
    for path in READMES:
        for launcher, name in readme_commands(path):
            if launcher == "python -m":
                targets.add(("module", name))
            elif launcher in ("python", "torchrun"):
                targets.add(("script", name))
    return sorted(targets)


# Runs every target's --help in ONE child process (torch is imported once, not per module):
# runpy executes it as __main__ with argv [name, "--help"]; SystemExit gives the exit status.
HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys, traceback
results = {}
for kind, name in json.loads(sys.argv[1]):
    out = io.StringIO()
    sys.argv = [name, "--help"]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if kind == "module":
                runpy.run_module(name, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(name, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        code, out = "exception", io.StringIO(traceback.format_exc())
    results[name] = {"code": code, "output": out.getvalue()[-2000:]}
print(json.dumps(results))
"""


def test_readme_config_reference_is_current():
    for path in READMES:
        text = path.read_text(encoding="utf-8")
        assert text.count(START) == 1 and text.count(END) == 1, f"{path.name}: expected one {START} ... {END} block"
        assert text == with_reference(text), (
            f"{path.name}: the config reference is out of date; run `python tests/test_docs.py --update`"
        )


def test_readmes_name_the_same_commands():
    english, chinese = readme_commands(README), readme_commands(README_ZH)
    assert english, "README.md names no command"
    assert english == chinese, (
        f"only in README.md: {sorted(english - chinese)}; only in README_zh.md: {sorted(chinese - english)}"
    )


def test_every_documented_command_exists_and_answers_help():
    targets = runnable_targets()
    assert ("script", "train.py") in targets and len(targets) > 10, targets
    missing = []
    for kind, name in targets:
        if kind == "script":
            if not (ROOT / name).is_file():
                missing.append(name)
        elif not (ROOT / (name.replace(".", "/") + ".py")).is_file():
            missing.append(name)
    assert not missing, f"commands in the READMEs name files that do not exist: {missing}"
    with_help = [[kind, name] for kind, name in targets if name not in NO_HELP]
    proc = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER, json.dumps(with_help)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {name: r for name, r in results.items() if r["code"] != 0 or not r["output"].strip()}
    assert not failed, "\n".join(f"{name} --help: exit {r['code']}\n{r['output']}" for name, r in failed.items())


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", ["README.md", "README_zh.md", "docs/design.md"])
def test_relative_links_point_at_existing_files(doc):
    path = ROOT / doc
    broken = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        file_part = target.split("#", 1)[0]
        if file_part and not (path.parent / file_part).exists():
            broken.append(target)
    assert not broken, f"{doc}: broken links {broken}"


def test_command_parsing():
    text = (
        "```bash\n"
        "python -m data.x --a=1 \\\n    --b=2\n"
        "Z2ALL_FAULT=kill@iter=3 python monitor_process.py -- python train.py --resume\n"
        "torchrun --standalone --nproc_per_node=2 train.py cfg.json\n"
        "make test FAST=1\n"
        "cp a b\n"
        "```\n"
        "python not_in_a_block.py\n"
    )
    names = [command_name(w) for w in command_lines(text)]
    assert names == [("python -m", "data.x"), ("python", "monitor_process.py"),
                     ("torchrun", "train.py"), ("make", "test")]


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_docs.py --update   (rewrites the config reference blocks)")
    for readme in READMES:
        readme.write_text(with_reference(readme.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"updated {readme.relative_to(ROOT)}")
