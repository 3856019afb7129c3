"""Every stage that starts from an earlier stage's checkpoint can load it: the sizes hold the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mardini.lit.checkpoints import check_metadata
from mardini.lit.base import CHECKPOINT_FORMAT
from mardini.models.registry import same_weights

ROOT = Path(__file__).resolve().parents[1]
CHAINS = sorted({p.parent for p in ROOT.glob("configs/**/0*_*.yaml")})


def _stages(chain: Path) -> dict[str, dict]:
    """``{checkpoint path the stage writes: model init_args}`` of a chain folder."""
    out = {}
    for path in sorted(chain.glob("[0-9]*_*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        logger = (cfg.get("trainer") or {}).get("logger", {}).get("init_args", {})
        if "save_dir" in logger:
            out[f"{logger['save_dir']}/{logger['name']}/checkpoints/last.ckpt"] = dict(
                cfg["model"]["init_args"], _file=path.name)
    return out


@pytest.mark.parametrize("chain", CHAINS, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_stage_can_load_the_stage_it_starts_from(chain):
    stages = _stages(chain)
    links = 0
    for args in stages.values():
        for key in ("init_from", "planner_ckpt", "generator_ckpt"):
            source = stages.get(args.get(key) or "")
            if source is None:
                continue
            links += 1
            theirs, ours = source.get("size", "tiny"), args.get("size", "tiny")
            assert same_weights(theirs, ours), f"{args['_file']} ({ours}) cannot load {source['_file']} ({theirs})"
    assert links >= 3  # the chain is linked (warm-ups -> joint -> joint tasks)


def test_a_stage_accepts_the_other_attention_variant_but_resume_does_not():
    ckpt = {"mardini": {"kind": "joint", "format": CHECKPOINT_FORMAT, "size": "mardini-s/st", "networks": []}}
    check_metadata(ckpt, ("joint",), "07.ckpt", "mardini-s/t", exact_size=False)  # /ST -> /T: same weights
    with pytest.raises(ValueError, match="model size 'mardini-s/st', this model is size 'mardini-s/t'"):
        check_metadata(ckpt, ("joint",), "07.ckpt", "mardini-s/t")  # resuming needs the same size
    with pytest.raises(ValueError, match="model size 'mardini-s/st', this model is size 'mardini-l/t'"):
        check_metadata(ckpt, ("joint",), "07.ckpt", "mardini-l/t", exact_size=False)  # other weights


def test_a_stage_loads_the_other_attention_variant_of_its_size(tmp_path):
    """The loader behind init_from / planner_ckpt / generator_ckpt takes /ST weights into a /T stage (the paper's
    stage 08 after 07); a resume (check_metadata's exact size) does not."""
    import torch

    from mardini.lit.checkpoints import load_network_states

    path = tmp_path / "07.ckpt"
    meta = {"kind": "joint", "format": CHECKPOINT_FORMAT, "size": "mardini-s/st", "networks": []}
    torch.save({"mardini": meta, "state_dict": {}}, path)
    assert load_network_states(path, ("joint",), (), size="mardini-s/t") == ({}, {})
    with pytest.raises(ValueError, match="mardini-s/st"):
        load_network_states(path, ("joint",), (), size="mardini-l/t")  # another size is still refused


def test_a_joint_stage_takes_the_generator_of_a_size_with_another_planner(tmp_path):
    """MarDini-S and -L share the generator (one shape): L's joint stage can start from S's generator warm-up
    (``generator_ckpt``), skipping three stages that would train the same network; a planner is still refused."""
    import torch

    from mardini.lit.checkpoints import load_network_states

    assert same_weights("mardini-s/st", "mardini-l/st", ("generator",))
    assert not same_weights("mardini-s/st", "mardini-l/st") and not same_weights("mardini-s/st", "mardini-l/st", ("planner",))
    path = tmp_path / "03.ckpt"
    meta = {"kind": "joint", "format": CHECKPOINT_FORMAT, "size": "mardini-s/st", "networks": ["planner", "generator"]}
    state = {"networks.planner.w": torch.ones(2), "networks.generator.w": torch.zeros(3)}
    torch.save({"mardini": meta, "state_dict": state}, path)
    raw, _ = load_network_states(path, ("joint",), ("generator",), size="mardini-l/st")
    assert list(raw) == ["generator"] and raw["generator"]["w"].shape == (3,)
    for names in (("planner",), ("planner", "generator"), ()):
        with pytest.raises(ValueError, match="model size 'mardini-s/st', this model is size 'mardini-l/st'"):
            load_network_states(path, ("joint",), names, size="mardini-l/st")
