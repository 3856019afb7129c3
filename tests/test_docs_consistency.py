"""The Markdown docs stay renderable and in step with the code and each other: tables GitHub can render, figures
one doc quotes from another, and options the written commands pass that their parsers declare."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", "outputs", ".git", "node_modules", ".pytest_cache"}
DOCS = sorted(p for p in ROOT.rglob("*.md") if not SKIP_DIRS & set(p.relative_to(ROOT).parts))
DELIMITER = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")


def cells(row: str) -> int:
    """Cells of a GFM table row: split on pipes, except escaped ones (``\\|``; a code span does not protect one)."""
    return len(row.strip().replace("\\|", "").strip("|").split("|"))


def table_problems(text: str) -> list[str]:
    """Each table row (delimiter or body) whose cell count differs from its header's, as ``line N: ...``."""
    problems, lines, fenced = [], text.splitlines(), False
    for i, line in enumerate(lines):
        fenced ^= line.startswith("```")
        if fenced or i == 0 or not DELIMITER.match(line.strip()):
            continue
        header, j = cells(lines[i - 1]), i
        while j < len(lines) and lines[j].startswith("|"):  # the delimiter row, then the body
            if cells(lines[j]) != header:
                problems.append(f"line {j + 1}: {cells(lines[j])} cells under a header of {header}")
            j += 1
    return problems


def test_the_cell_rule_matches_gfm():
    assert cells("| a | `b` | c \\| d |") == 3
    assert table_problems("| a | b |\n|---|---|---|\n| 1 | 2 |\n") == ["line 2: 3 cells under a header of 2"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_row_has_its_header_s_cells(doc):
    """GitHub renders a table only when its delimiter row has the header's cell count (else the rows show as text)
    and drops a body row's extra cells: bench/README.md's 1/4-scale Table 3 had 10 delimiter cells under 9."""
    assert not table_problems(doc.read_text()), f"{doc.relative_to(ROOT)}: {table_problems(doc.read_text())}"


def demo_row(readme: str, method: str) -> list[str]:
    """The figures of one method's row in README.md's demo table (MidF-PSNR, SSIM, found, px found, px all)."""
    row = re.search(rf"^\| (?:\*\*)?{re.escape(method)}(?:\*\*)? \|(.*)\|$", readme, flags=re.M)
    assert row, f"README.md's demo table has no row for {method}"
    return [c.strip().strip("*") for c in row.group(1).split("|")]


def test_studies_quotes_the_readme_s_demo_figures():
    """STUDIES.md's opening names the README's demo figures: it quoted sessions 1-4's 16.16 / 0.651, 14.13 px after
    the README's table had moved to the current code's 16.17 / 0.652, 14.23 px."""
    readme = (ROOT / "README.md").read_text()
    opening = (ROOT / "STUDIES.md").read_text().split("\n\n")[1].replace("\n", " ")
    model, blend, nearest = (demo_row(readme, m) for m in ("MarDini (tiny)", "linear blend", "nearest frame"))
    quoted = [f"{model[0]} / {model[1]} against the blend's {blend[0]} / {blend[1]}",
              f"the nearest frame's {nearest[0]} / {nearest[1]}", f"{round(100 * float(model[2]))} % of the objects",
              f"{model[4]} px over all objects against the nearest frame's {nearest[4]}"]
    assert [q for q in quoted if q not in opening] == [], opening


SCRIPTS = {"sample.py": "mardini/pipeline/cli.py", "evaluate.py": "mardini/evaluation/arguments.py",
           "mardini.pipeline.cli": "mardini/pipeline/cli.py",
           "mardini.evaluation.cli": "mardini/evaluation/arguments.py"}  # evaluate.py's parser: arguments.py
LIGHTNING = {"train.py", "mardini.cli"}  # LightningCLI: its flags are the configs' keys (tests/test_configs.py)
COMMAND = re.compile(r"python\s+(?:-m\s+(?P<module>[A-Za-z_][\w.]*\w)(?![\w.<{])|(?P<script>[\w/]+\.py))(?P<args>[^`\n#]*)")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
SOURCES = sorted(p for p in [*DOCS, *ROOT.glob("*.py"), *(ROOT / "mardini").rglob("*.py"), *(ROOT / "bench").rglob(
    "*.py"), *(ROOT / "data").glob("*.py"), *(ROOT / "data").glob("*.sh"), *(ROOT / "configs").rglob("*.yaml"),
    ROOT / "Makefile"]
    if not SKIP_DIRS & set(p.relative_to(ROOT).parts))


def _option_strings(call: ast.Call) -> set[str]:
    return {a.value for a in call.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str:
    return getattr(call.func, "attr", getattr(call.func, "id", ""))


def _helpers() -> dict[str, set[str]]:
    """Functions of the library that add options to a parser they are given (``add_threads_argument``): name ->
    the options."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "mardini").rglob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef):
                flags = set().union(*(_option_strings(c) for c in _calls(fn) if _name(c) == "add_argument"))
                if flags and not fn.name.startswith(("_", "main", "parse")):
                    found[fn.name] = flags
    return found


def declared_options(path: Path, helpers: dict[str, set[str]]) -> set[str]:
    """The options a script's argparse parser declares: its ``add_argument`` calls and the helpers it calls."""
    declared = {"--help"}
    for call in _calls(ast.parse(path.read_text())):
        declared |= _option_strings(call) if _name(call) == "add_argument" else helpers.get(_name(call), set())
    return declared


def command_file(match: re.Match) -> Path | None:
    """The file that parses a ``python -m MODULE`` / ``python SCRIPT.py`` command's arguments (a package's
    ``main.py``, which its ``__main__.py`` runs; None: LightningCLI)."""
    name = match["module"] or match["script"]
    if name in LIGHTNING:
        return None
    if name in SCRIPTS:
        return ROOT / SCRIPTS[name]
    if match["script"]:
        return ROOT / name
    base = ROOT.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "main.py", base / "__main__.py") if p.exists()), base)


def doc_commands(path: Path):
    """``(command match, line)`` of each ``python`` command written in a file (continuation lines joined)."""
    for line in re.sub(r"\\\n\s*#?\s*", " ", path.read_text()).splitlines():
        for match in COMMAND.finditer(line):
            if match["module"] in ("pytest", "pip", "venv", "jupyter") or match["script"] == "my_method.py":
                continue  # not the project's commands (my_method.py: the evaluation README's external method)
            yield match, line.strip()


def test_every_option_a_written_command_passes_is_one_its_parser_declares():
    """Each ``python -m mardini.X ... --flag`` / ``python sample.py ... --flag`` written in a doc, docstring, config
    comment or the Makefile names a module that exists and an option that module's parser declares (read from its
    source: no import)."""
    helpers, declared, wrong = _helpers(), {}, []
    for path in SOURCES:
        for match, line in doc_commands(path):
            target = command_file(match)
            if target is None:
                continue
            if not target.is_file():
                wrong.append(f"{path.relative_to(ROOT)}: no {target.relative_to(ROOT)} for `{line}`")
                continue
            known = declared.setdefault(target, declared_options(target, helpers))
            wrong += [f"{path.relative_to(ROOT)}: {target.relative_to(ROOT)} declares no {flag} (`{line}`)"
                      for flag in FLAG.findall(match["args"]) if flag not in known]
    assert not wrong, "\n".join(wrong)


def test_the_readme_gives_the_threads_default_the_commands_apply():
    """Each ``--threads N`` the README describes (the demo's, the reproduction's) states ``mardini.threads``'s default
    rule: the demo's said 'else 2', where the demo takes ``min(2, CPUs)`` (``DEFAULT_THREADS``)."""
    from mardini.threads import DEFAULT_RULE

    readme = re.sub(r"\s+", " ", (ROOT / "README.md").read_text()).replace("`", "")
    described = re.findall(r"--threads N sets torch's intra-op threads,?[^(]*\(([^;)]*)", readme)
    assert len(described) == 2, described
    rule = DEFAULT_RULE.replace("default:", "default")
    assert [d for d in described if not d.startswith(rule)] == [], (rule, described)



CONFIGURED = [("mardini/lit/base.py", "MarDiniBase"), ("mardini/lit/generation.py", "GenerationModule"),
              ("mardini/lit/joint.py", "MarDiniModule"), ("mardini/data/datamodule.py", "VideoDataModule"),
              ("mardini/autoencoders/pixel.py", "SpaceToDepthAutoencoder"),
              ("mardini/autoencoders/diffusers_kl.py", "DiffusersAutoencoder"),
              ("mardini/evaluation/callbacks.py", "_TaskEval"), ("mardini/data/stream.py", "ClipStream"),
              ("mardini/metrics/fid.py", "FrameFID"), ("mardini/pipeline/pipeline.py", "MarDiniPipeline"),
              ("mardini/evaluation/external.py", "GeneratedVideos")]


@pytest.mark.parametrize("path,name", CONFIGURED, ids=[n for _, n in CONFIGURED])
def test_every_argument_a_config_sets_has_its_own_docstring_entry(path, name):
    """The classes a stage YAML names: ``train.py fit --model.help CLASS`` (``--data.help``, the autoencoder's too)
    prints each argument's entry in the class docstring's ``Args:``, as docstring_parser reads it, one name per
    entry. MarDiniBase's ``blr, lr: ...``-style entries (and GenerationModule's, VideoDataModule's,
    DiffusersAutoencoder's) left 14 of MarDiniModule's arguments without a word of help, and ``weight_decay``,
    ``betas`` and SpaceToDepthAutoencoder's arguments had no entry at all. The evaluation callbacks (their shared
    ``_TaskEval``) said "other arguments: see EvalProtocol", leaving ``seed``, ``steps``, ``guidance_scale``, ``eta``
    and the weight paths without help; ClipStream, FrameFID, MarDiniPipeline and GeneratedVideos (evaluate.py's
    ``--generated``) had ``a, b: ...`` entries."""
    import docstring_parser

    cls = next(n for n in ast.walk(ast.parse((ROOT / path).read_text()))
               if isinstance(n, ast.ClassDef) and n.name == name)
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    args = [a.arg for a in (*init.args.args, *init.args.kwonlyargs) if a.arg != "self"]
    described = {p.arg_name for p in docstring_parser.parse(ast.get_docstring(cls) or "").params if p.description}
    missing = [a for a in args if a not in described]
    assert not missing, f"{path}: {name}'s docstring gives no Args entry of its own to {missing}"


def test_no_doc_says_element_reduction_refuses_gradient_accumulation():
    """``loss_reduction: element`` trains with ``trainer.accumulate_grad_batches`` above 1 (``ElementWindow``;
    tests/test_loss_reduction.py), refusing only a strategy that accumulates by itself; configs/paper/README.md still
    said 'it refuses `trainer.accumulate_grad_batches` above 1' after the code stopped refusing."""
    refusal = re.compile(r"refuses `*trainer\.accumulate_grad_batches`* above 1|`*trainer\.accumulate_grad_batches`*"
                         r"\s+above 1 is refused|refuses `*trainer\.accumulate_grad_batches")
    stale = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p in SOURCES
             for m in refusal.finditer(re.sub(r"\s+", " ", p.read_text()))]
    assert not stale, stale


def _stage_clips() -> list[tuple[str, int, float, int]]:
    """``(config, frames, fps, short side)`` of each shipped stage config that sets its clips."""
    import yaml

    stages = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        data = ((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("init_args") or {}
        if {"frames", "fps", "resolution"} <= set(data):
            side = data["resolution"] if isinstance(data["resolution"], int) else min(data["resolution"])
            stages.append((str(path.relative_to(ROOT)), data["frames"], data["fps"], side))
    return stages


def _flag(line: str, name: str, default: float | None) -> float | None:
    """The number a written command passes to ``--name`` (``default`` where it passes none)."""
    found = re.search(rf"--{name}\s+([\d.e]+)", line)
    return float(found[1]) if found else default


def test_the_written_shard_commands_cut_clips_the_stages_they_feed_can_read():
    """data/README.md's example, ``videos_to_shards.py ... --clip-frames 32 --short-side 256 --max-fps 30``, cut
    clips one frame short of the tiny configs (and the 256-px paper stages): 9 frames at 8 fps from 30 fps take
    every 4th frame, a span of 33, so setup refused every clip. Each written command with ``--max-fps R`` must cut
    clips that a source at R fps fills for every stage config whose resolution its ``--short-side`` covers. Every
    file that writes commands is read (docs, docstrings, data/*.sh): videos_to_shards.py's docstring and
    data/fetch_real_videos.sh gave ``--clip-frames 32`` with no ``--max-fps``. A command that sets
    ``--clip-frames`` had to pass ``--max-fps``: without it clips kept each source's rate, which no clip length
    fits (mecavideo's 187 fps file needs 185 stored frames for 9 frames at 8 fps, a 30 fps file 33); the script's
    defaults now keep at most 30 fps, and a flag a command leaves out is checked at its default."""
    import importlib.util

    from mardini.data.decode import ClipTooShort, max_start

    spec = importlib.util.spec_from_file_location("videos_to_shards", ROOT / "data" / "videos_to_shards.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    defaults = cli.parse_args(["IN", "OUT"])  # a flag a command leaves out (the defaults: every config's clips)
    checked, short = 0, []
    for doc in SOURCES:
        for match, line in doc_commands(doc):
            if not (match["script"] or "").endswith("videos_to_shards.py"):
                continue
            rate = _flag(line, "max-fps", defaults.max_fps)
            if not rate:
                short.append(f"{doc.relative_to(ROOT)}: --max-fps 0 (clips at each source's rate, which no clip "
                             f"length fits): `{line}`")
                continue
            clip = int(_flag(line, "clip-frames", defaults.clip_frames))
            side = _flag(line, "short-side", float("inf"))
            for config, frames, fps, size in _stage_clips():
                if size > side:
                    continue  # shards for other stages
                checked += 1
                try:
                    max_start(rate, clip, fps, frames)
                except ClipTooShort as err:
                    short.append(f"{doc.relative_to(ROOT)}: --clip-frames {clip:g} at {rate:g} fps for {config}: {err}")
    assert checked >= 10 and not short, "\n".join(short)
