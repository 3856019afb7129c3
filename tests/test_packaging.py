"""pyproject.toml's dependency ranges: the releases they admit are ones the code runs on, and they hold the pins."""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# The first release of each dependency with what the code uses: a lower minimum lets pip keep or pick a release
# the code fails on (each one seen failing below its floor).
FLOORS = {
    "lightning": "2.6.0",  # Trainer.fit(weights_only=...), which mardini/cli.py sets (2.5.6: no action for it)
    "jsonargparse": "4.39.0",  # what Lightning 2.6's CLI passes its instantiators (4.32: applied_instantiation_links)
    "timm": "1.0.17",  # timm.layers.RmsNormFp32 (planner, generator; 1.0.16: ImportError)
}


def ranges(*extras: str) -> dict[str, Requirement]:
    """The runtime dependencies (and those of ``extras``) by canonical name."""
    lines = [*PROJECT["dependencies"], *(r for e in extras for r in PROJECT["optional-dependencies"][e])]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def pins(name: str) -> dict[str, Version]:
    """The exact pins of a requirements file (its own lines; ``-r`` includes are not followed)."""
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{name}: {line} is not an exact pin"
        out[canonicalize_name(req.name)] = Version(spec.version)
    return out


def minimum(req: Requirement) -> Version | None:
    """The lowest release a range admits by its lower bounds (None without one)."""
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", ">", "==", "~=")]
    return max(lows) if lows else None


def test_minimums_are_releases_with_what_the_code_uses():
    deps = ranges()
    low = {name: minimum(deps[name]) for name in FLOORS}
    assert all(low[name] is not None and low[name] >= Version(floor) for name, floor in FLOORS.items()), low


def test_every_pin_satisfies_pyproject_s_ranges():
    runtime = pins("requirements.txt")
    assert set(runtime) == set(ranges())  # each runtime dependency pinned, each pin declared
    for file, deps in (("requirements.txt", ranges()), ("requirements-dev.txt", ranges("dev"))):
        for name, version in pins(file).items():
            assert deps[name].specifier.contains(version, prereleases=True), f"{file}: {name}=={version}, {deps[name]}"


def test_requires_python_admits_no_python_a_pinned_release_refuses():
    oldest = minimum(Requirement(f"python{PROJECT['requires-python']}"))
    refused = {}
    for name, version in {**pins("requirements.txt"), **pins("requirements-dev.txt")}.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        needs = dist.metadata["Requires-Python"]
        if Version(dist.version) == version and needs and not SpecifierSet(needs).contains(oldest):
            refused[f"{name}=={version}"] = needs
    assert not refused, f"requires-python {PROJECT['requires-python']}, but {refused}"


def test_ranges_keep_newer_releases_than_the_pins():
    """The pins are this machine's; a range capped at a pin would make pip downgrade a user's newer release (for
    torch, a multi-GB download). The release after each pin's minor version must be admitted."""
    deps = ranges()
    capped = {name: str(deps[name].specifier) for name, pin in pins("requirements.txt").items()
              if not deps[name].specifier.contains(Version(f"{pin.major}.{pin.minor + 1}.0"))}
    assert not capped, f"capped at the pins: {capped}"


def test_no_extra_needs_a_package_pip_cannot_build_in_isolation():
    """``pip install -e '.[gpu]'`` (flash-attn) failed: flash-attn's setup.py imports torch, which pip's isolated
    build environment lacks (README: install it after torch, with --no-build-isolation)."""
    extras = {e: [Requirement(r).name for r in reqs] for e, reqs in PROJECT["optional-dependencies"].items()}
    assert not [e for e, names in extras.items() if "flash-attn" in names], extras


def test_the_license_is_an_spdx_expression_with_its_text_shipped():
    """``license = {text = ...}`` is deprecated by setuptools (unsupported after 2027-02-18) and shipped no text."""
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    setuptools = next(Requirement(r) for r in build["requires"] if Requirement(r).name == "setuptools")
    assert minimum(setuptools) >= Version("77")  # the first setuptools to read license-files and SPDX licenses
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    assert "Apache License\n                           Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()


@pytest.mark.parametrize("command, usage", [
    (["mardini.cli", "fit", "--help"], "usage: python -m mardini.cli [options] fit"),
    (["mardini.pipeline.cli", "--help"], "usage: python -m mardini.pipeline.cli [-h]"),  # before: "usage: sample.py"
    (["mardini.evaluation.cli", "--help"], "usage: python -m mardini.evaluation.cli [-h]"),  # "usage: evaluate.py"
])
@pytest.mark.filterwarnings("ignore:'mardini.*' found in sys.modules:RuntimeWarning")  # runpy: imported before
def test_the_cli_modules_run_with_python_m(monkeypatch, capsys, command, usage):
    """``python -m mardini.cli fit --help`` (train.py's CLI, what an install without the scripts runs) and ``python -m
    mardini.pipeline.cli --help`` (sample.py's) printed nothing and exited 0: the modules had no ``__main__`` guard."""
    import runpy

    monkeypatch.setattr(sys, "argv", [f"{command[0].replace('.', '/')}.py", *command[1:]])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module(command[0], run_name="__main__")
        raise SystemExit("returned without running")
    assert exit.value.code == 0 and capsys.readouterr().out.startswith(usage)
