"""The repository this package runs from, found from the package's location, not the current folder.

In a source checkout, or an editable install of one (``pip install -e .``), ``configs/``, ``bench/`` and ``weights/``
sit beside the ``mardini`` package, and the demo, the reproduction and ``configs_table`` read the shipped stage
configs there from any folder (their data and outputs go under the folder they run in). A non-editable install
(``pip install .``) copies the package alone into site-packages: :func:`repo_path` then says that the command needs
the checkout.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository in a checkout; site-packages in a non-editable install


def is_checkout(root: Path | None = None) -> bool:
    """True when ``root`` (default :data:`ROOT`) is the repository: its pyproject.toml and configs/ are there."""
    root = ROOT if root is None else root
    return (root / "pyproject.toml").is_file() and (root / "configs").is_dir()


def repo_path(relative: str) -> Path:
    """``ROOT / relative``, a file or folder of the repository that a command reads (``"configs/tiny"``).

    Raises:
        FileNotFoundError: it is not there, saying why: mardini was installed without its checkout (clone it and
            ``pip install -e .`` there), or the checkout lacks it (restore it with git).
    """
    path = ROOT / relative
    if path.exists():
        return path
    if is_checkout():
        raise FileNotFoundError(f"{path} is missing from the checkout: restore it with `git -C {ROOT} checkout -- "
                                f"{relative}`")
    raise FileNotFoundError(f"this command reads the repository's {relative}, and mardini runs from {ROOT}, "
                            "which is no source checkout (`pip install .` copies the package alone): clone the "
                            "repository, `pip install -e .` in the clone, and run the command again")
