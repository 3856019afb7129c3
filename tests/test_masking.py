import pytest
import torch

from mardini.masking import (
    TEMPLATES,
    MaskSampler,
    expansion_mask,
    image_to_video_mask,
    interpolation_mask,
    mask_from_given,
    n_ref_from_ratio,
    validate_mask,
)


def test_named_templates():
    assert interpolation_mask(9).tolist() == [False] + [True] * 7 + [False]
    assert image_to_video_mask(5, 2).tolist() == [True, True, False, True, True]
    assert image_to_video_mask(5, -1).tolist() == [True] * 4 + [False]
    assert image_to_video_mask(5, -5).tolist() == [False] + [True] * 4
    for index in (5, -6, -100):  # outside the window, counted either way: an error, not a wrapped index
        with pytest.raises(ValueError, match="outside the window of 5 frames"):
            image_to_video_mask(5, index)
    assert expansion_mask(6, 2).tolist() == [False, False, True, True, True, True]


@pytest.mark.parametrize(
    "frames, given, message",
    [(5, [], "no frame is given"), (3, [0, 1, 2], "every one"), (4, [4], "outside"), (1, [0], ">= 2")],
)
def test_mask_from_given_errors(frames, given, message):
    with pytest.raises(ValueError, match=message):
        mask_from_given(frames, given)


def test_n_ref_rounding_and_clamp():
    assert n_ref_from_ratio(1.0, 9).item() == 8  # never every frame
    assert n_ref_from_ratio(0.01, 17).item() == 1  # never none
    assert n_ref_from_ratio(0.06, 17).item() == 1  # paper: 6 % of 17 ~ image-to-video
    assert n_ref_from_ratio(0.30, 17).item() == 5  # paper: 1-5 of 17


@pytest.mark.parametrize("frames", [2, 4, 9, 17])
def test_sampler_masks_are_valid_and_match_ratio(frames):
    sampler = MaskSampler(keep_ratio=(0.15, 0.6), template_probs={"random": 1.0})
    gen = torch.Generator().manual_seed(0)
    mask, template = sampler.sample(512, frames, gen)
    validate_mask(mask)
    assert (template == TEMPLATES.index("random")).all()
    n_ref = (~mask).sum(1)
    lo, hi = n_ref_from_ratio(0.15, frames).item(), n_ref_from_ratio(0.6, frames).item()
    assert n_ref.min() >= lo and n_ref.max() <= hi
    if frames >= 9:
        assert n_ref.min() == lo and n_ref.max() == hi  # the whole range is reached
        # positions are uniform: every frame is a reference sometimes
        assert (~mask).any(0).all()


def test_sampler_templates():
    sampler = MaskSampler(keep_ratio=(0.3, 0.5), template_probs={"interpolation": 1, "image_to_video": 1, "expansion": 1})
    mask, template = sampler.sample(600, 9, torch.Generator().manual_seed(1))
    validate_mask(mask)
    counts = torch.bincount(template, minlength=len(TEMPLATES))
    assert counts[0] == 0 and (counts[1:] > 150).all()
    interp = mask[template == 1]
    assert (~interp[:, 0]).all() and (~interp[:, -1]).all() and interp[:, 1:-1].all()
    i2v = mask[template == 2]
    assert ((~i2v).sum(1) == 1).all()
    expand = mask[template == 3]
    n = (~expand).sum(1)
    assert all((~row[:k]).all() and row[k:].all() for row, k in zip(expand, n.tolist()))


def test_sampler_is_deterministic_by_generator():
    sampler = MaskSampler()
    a = sampler.sample(8, 9, torch.Generator().manual_seed(3))
    b = sampler.sample(8, 9, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keep_ratio": (0.0, 0.5)}, "keep_ratio"),
        ({"keep_ratio": (0.6, 0.5)}, "keep_ratio"),
        ({"keep_ratio": (0.5, 1.2)}, "keep_ratio"),
        ({"template_probs": {"bogus": 1.0}}, "unknown task templates"),
        ({"template_probs": {"random": 0.0}}, "positive sum"),
    ],
)
def test_sampler_rejects_impossible_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskSampler(**kwargs)


def test_validate_mask_errors():
    with pytest.raises(ValueError, match="every frame"):
        validate_mask(torch.tensor([[True, True]]))
    with pytest.raises(ValueError, match="gives every frame"):
        validate_mask(torch.tensor([[False, False]]))
    with pytest.raises(ValueError, match="bool"):
        validate_mask(torch.zeros(1, 3))


@pytest.mark.parametrize("ratio, frames, n_ref", [(0.75, 9, 7), (0.35, 9, 3), (0.05, 9, 1), (1.0, 9, 8), (0.5, 4, 2)])
def test_n_ref_rounds_to_nearest_and_clamps(ratio, frames, n_ref):
    # PAPER.md §3.2 / masking docstring: n_ref = clamp(round(r T), 1, T - 1)
    assert int(n_ref_from_ratio(ratio, frames)) == n_ref


@pytest.mark.parametrize("template", ["expansion", "random"])
def test_ratio_templates_give_exactly_n_ref_frames(template):
    """Expansion and random both give n_ref(r) references: a keep ratio of 1 still leaves one frame to generate."""
    frames = 9
    for lo, hi in ((1.0, 1.0), (0.5, 0.5), (0.35, 1.0)):
        sampler = MaskSampler(keep_ratio=(lo, hi), template_probs={template: 1.0})
        mask, _ = sampler.sample(256, frames, torch.Generator().manual_seed(0))
        validate_mask(mask)
        n = (~mask).sum(1)
        assert n.min() == n_ref_from_ratio(lo, frames) and n.max() == n_ref_from_ratio(hi, frames)


def test_image_to_video_template_places_its_frame_anywhere():
    """I2V training masks must put the given frame at every index, or ``image_to_video(index=-1)`` is never trained."""
    sampler = MaskSampler(template_probs={"image_to_video": 1.0})
    mask, _ = sampler.sample(400, 9, torch.Generator().manual_seed(0))
    where = (~mask).float().argmax(1)  # (B,) index of the single given frame
    counts = torch.bincount(where, minlength=9)
    assert (counts > 20).all(), counts.tolist()  # ~44 per index when uniform


def test_a_sampler_that_draws_an_unusable_row_is_refused_naming_its_template():
    """draw() (what the training steps call) checks sample(): every row a given and a generated frame."""
    from mardini.lit import GenerationModule

    class AllGenerated(MaskSampler):
        def sample(self, batch, frames, generator=None):
            mask, template = super().sample(batch, frames, generator)
            mask[1] = True  # (T,) row 1 generates every frame
            return mask, template

    torch.manual_seed(0)
    module = GenerationModule(size="tiny", frames=5)
    module.mask_sampler = AllGenerated()
    video = torch.rand(3, 5, 3, 32, 32) * 2 - 1  # (B, T, 3, H, W)
    with pytest.raises(ValueError, match=r"AllGenerated\.sample drew a mask row that generates every frame"):
        module.compute_loss({"video": video}, torch.Generator().manual_seed(0), True)

    sampler = AllGenerated((0.3, 0.6), {"expansion": 1.0})
    with pytest.raises(ValueError, match=r"AllGenerated\.sample drew a mask row that generates every frame "
                                         r"\(row 1, template 'expansion', 5 frames\)"):
        sampler.draw(3, 5, torch.Generator().manual_seed(0))

    class NoneGenerated(MaskSampler):
        def sample(self, batch, frames, generator=None):
            mask, template = super().sample(batch, frames, generator)
            return torch.zeros_like(mask), template  # (B, T) every frame given

    with pytest.raises(ValueError, match=r"gives every frame \(row 0, template 'interpolation'"):
        NoneGenerated((0.5, 0.5), {"interpolation": 1.0}).draw(2, 4)


def test_template_rows_follow_the_order_of_the_sampler_s_templates():
    """The templates' masks are stacked by name in the class's ``templates`` order: a subclass that reorders them
    keeps each name's mask at its new index."""

    class Reversed(MaskSampler):
        templates = tuple(reversed(TEMPLATES))

    sampler = Reversed((0.3, 0.6), {"interpolation": 1.0})
    mask, template = sampler.sample(4, 6, torch.Generator().manual_seed(0))
    assert [Reversed.templates[i] for i in template.tolist()] == ["interpolation"] * 4
    assert torch.equal(mask, interpolation_mask(6).expand(4, -1))


def _sample_before_given_frames(keep_ratio, template_probs, batch, frames, generator):
    """MaskSampler.sample as it was before templates became a class's (a copy): the draws the shipped configs'
    training made, which the built-in templates must keep."""
    probs = torch.tensor([float(template_probs.get(n, 0.0)) for n in TEMPLATES], dtype=torch.float64)
    probs = probs / probs.sum()
    template = torch.multinomial(probs.expand(batch, -1), 1, generator=generator).squeeze(1)
    lo, hi = keep_ratio
    r = lo + (hi - lo) * torch.rand(batch, generator=generator, dtype=torch.float64)
    n_ref = n_ref_from_ratio(r, frames)
    order = torch.rand(batch, frames, generator=generator).argsort(dim=1)
    rank = order.argsort(dim=1)
    ar = torch.arange(frames).expand(batch, -1)
    given_random = rank < n_ref[:, None]
    given_prefix = ar < n_ref[:, None]
    given_interp = (ar == 0) | ((ar == frames - 1) & (frames > 2))
    i2v_index = torch.randint(0, frames, (batch,), generator=generator)
    given_i2v = ar == i2v_index[:, None]
    by_name = {"random": given_random, "interpolation": given_interp, "image_to_video": given_i2v,
               "expansion": given_prefix}
    given = torch.stack([by_name[name] for name in TEMPLATES], dim=1)
    given = given[torch.arange(batch), template]
    return ~given, template


@pytest.mark.parametrize("keep_ratio, probs", [
    ((0.45, 1.0), {"random": 1.0}),  # the tiny chain's warm-ups
    ((0.25, 0.8), {"random": 1.0, "interpolation": 1.0, "image_to_video": 1.0, "expansion": 0.5}),  # 05's mix
    ((0.15, 0.6), {"expansion": 2.0, "image_to_video": 1.0}),
])
def test_the_built_in_templates_draw_what_they_drew_before_templates_became_extensible(keep_ratio, probs):
    """The same masks and templates, draw for draw, as the code before ``given_frames`` (the demo stays the same),
    and the generator left in the same state for the draws that follow (times, noise)."""
    for seed, batch, frames in ((0, 8, 4), (1, 8, 9), (7, 3, 17), (123, 16, 2)):
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        mask, template = MaskSampler(keep_ratio, probs).draw(batch, frames, ours)
        old_mask, old_template = _sample_before_given_frames(keep_ratio, probs, batch, frames, theirs)
        assert torch.equal(mask, old_mask) and torch.equal(template, old_template), (seed, batch, frames)
        assert torch.equal(ours.get_state(), theirs.get_state())


def test_a_subclass_adds_a_template_of_its_own():
    """``every_other`` (tests/user_extensions.py): declared in ``templates``, its mask from ``given_frames``."""
    from user_extensions import EveryOtherSampler

    assert EveryOtherSampler.templates == (*TEMPLATES, "every_other")
    sampler = EveryOtherSampler((0.3, 0.6), {"every_other": 1.0, "random": 1.0})
    mask, template = sampler.draw(64, 5, torch.Generator().manual_seed(0))  # (64, 5), (64,)
    mine = template == EveryOtherSampler.templates.index("every_other")
    assert 10 < int(mine.sum()) < 54 and set(template.tolist()) == {0, 4}
    assert (mask[mine] == torch.tensor([False, True, False, True, False])).all()
    validate_mask(mask)
    with pytest.raises(ValueError, match=r"unknown task templates \['every_other'\]; allowed: \['random', "
                                         r"'interpolation', 'image_to_video', 'expansion'\] "
                                         r"\(MaskSampler.templates\); a new template needs a MaskSampler subclass "
                                         r".* model.init_args.mask_sampler"):
        MaskSampler(template_probs={"every_other": 1.0})


def test_a_subclass_that_does_not_give_its_template_s_frames_is_refused_naming_them():
    class Forgot(MaskSampler):
        templates = (*TEMPLATES, "keyframes", "last")

        def given_frames(self, batch, frames, n_ref, generator=None):
            given = super().given_frames(batch, frames, n_ref, generator)
            given["last"] = torch.arange(frames) == frames - 1  # (T,), not (B, T)
            return given

    with pytest.raises(ValueError, match=r"Forgot.given_frames returned no \(2, 4\) bool mask for the templates "
                                         r"\['keyframes', 'last'\]; return one for each of its templates"):
        Forgot(template_probs={"random": 1.0}).draw(2, 4)

    class Twice(MaskSampler):
        templates = ("random", "random")

    with pytest.raises(ValueError, match=r"Twice.templates=\('random', 'random'\) must be distinct names"):
        Twice()


def test_mask_sampler_class_paths():
    from mardini.masking import mask_sampler_class
    from user_extensions import EveryOtherSampler

    assert mask_sampler_class(None) is MaskSampler
    assert mask_sampler_class("user_extensions.EveryOtherSampler") is EveryOtherSampler
    for path, message in [
        ("user_extensions.NoSuchSampler", r"model.mask_sampler='user_extensions.NoSuchSampler' does not import "
                                          r"\(.*\); give the class path"),
        ("no_such_package.Sampler", r"does not import \(No module named 'no_such_package'\)"),
        ("EveryOtherSampler", r"does not import"),
        ("user_extensions.AvgPoolAutoencoder", r"model.mask_sampler='user_extensions.AvgPoolAutoencoder' is <class "
                                               r"'user_extensions.AvgPoolAutoencoder'>, not a MaskSampler subclass"),
    ]:
        with pytest.raises(ValueError, match=message):
            mask_sampler_class(path)
