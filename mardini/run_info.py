"""What a report or a training run says about itself: the command line that reproduces it, the machine it ran on,
the code (package version, git commit) and the libraries' versions."""

from __future__ import annotations

import hashlib
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import mardini
from mardini import cpu_kernels

# the libraries whose versions change what a run trains or how fast (webdataset and av: the data it reads)
LIBRARIES = ("torch", "lightning", "numpy", "timm", "einops", "webdataset", "av", "jsonargparse", "diffusers",
             "flash-attn")


def command_line(prog: list[str], argv: list[str] | None) -> str:
    """``prog`` and ``argv`` (this process's own arguments when None), quoted for a shell."""
    return shlex.join([*prog, *(sys.argv[1:] if argv is None else argv)])


def machine_line() -> str:
    """Architecture, torch threads, torch version and the CPU's bf16 matmul kernels (which decide the last digits
    of bf16 figures, :mod:`mardini.cpu_kernels`)."""
    threads = torch.get_num_threads()
    return f"{platform.machine()}, {threads} threads, torch {torch.__version__}, {cpu_kernels.describe()}"


def code_version(root: Path | None = None) -> dict[str, Any]:
    """The code that ran: the package version and, where the package is a git checkout (``root``, default the
    folder above the ``mardini`` package, is the top of its repository), ``git rev-parse HEAD`` and whether
    ``git status`` lists changes (untracked files included); both None otherwise, and then ``source`` too
    (:func:`source_digest`: an installed wheel or a tarball of other code has another)."""
    root = (root or Path(mardini.__file__).resolve().parents[1]).resolve()

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)

    commit = dirty = None
    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode == 0 and Path(top.stdout.strip()).resolve() == root:  # not a repository around a venv
            head = git("rev-parse", "HEAD")
            commit = head.stdout.strip() if head.returncode == 0 else None
            status = git("status", "--porcelain")
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        pass
    code = {"version": mardini.__version__, "git_commit": commit, "git_dirty": dirty}
    return code if commit else {**code, "source": source_digest()}


def source_digest(package: Path | None = None) -> str:
    """``sha256:<16 hex>`` of the package's Python sources (``package``, default the ``mardini`` folder): each
    ``.py`` file's path in it and its bytes, in path order. What tells two codes apart where no git commit is known;
    a few milliseconds."""
    package = package or Path(mardini.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(f"{path.relative_to(package).as_posix()}\0{path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()[:16]


def describe_code(code: dict[str, Any] | None) -> str:
    """``mardini 0.1.0, commit 0123abcd4567`` of a :func:`code_version` dict (what a latent cache or an evaluation
    records), ``mardini 0.1.0, no git commit (not a git checkout), source sha256:...`` outside a checkout; what is
    unrecorded said so."""
    code = code or {}
    commit = code.get("git_commit")
    where = f"commit {commit[:12]}" if commit else "no git commit (not a git checkout)"
    if not commit:
        where += f", source {code['source']}" if code.get("source") else ", source unrecorded"
    return f"mardini {code.get('version') or '(version unrecorded)'}, {where}"


def library_versions() -> dict[str, str | None]:
    """Python's version and each of :data:`LIBRARIES`' installed versions (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
