"""Writes the three notebooks of this folder (clean: no outputs) from the cells below.

    python notebooks/build.py                                # rewrite notebooks/*.ipynb (no outputs)
    python notebooks/build.py --execute outputs/notebooks    # = make notebooks: run them, executed copies there

Edit the cells here or in Jupyter; either way commit the notebooks without outputs (this script writes none,
``tests/test_notebooks.py`` checks it). The notebooks call the package only.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''\
import os
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets: plain bars
if not Path("mardini").is_dir() and Path("../mardini").is_dir():
    os.chdir("..")  # opened from notebooks/: every path below is relative to the repository root
import torch

from mardini import testing

QUICK = testing.quick()  # MARDINI_NOTEBOOK_QUICK=1 (the test suite): temp data and checkpoint, tiny sizes
if QUICK:
    torch.set_num_threads(1)  # the shared CI CPU: one thread is faster for these small networks
print("repository:", Path.cwd(), "| quick mode:", QUICK)'''

# ------------------------------------------------------------------------------------------------
# 01: data and masks
# ------------------------------------------------------------------------------------------------
DATA_AND_MASKS = [
    ("md", """\
# 1. Data and masks

What MarDini trains on: clips streamed from WebDataset shards, frame masks (True = generate, False = given),
the task templates those masks come from, and the curriculum that moves the kept fraction during training.

Run from the repository root (or from `notebooks/`; the first cell moves to the root). It uses the embedded
synthetic set in `data/shards/synthetic` when it exists (`make demo` or `python data/make_synthetic.py` write it),
otherwise it writes a small synthetic set to a temp folder."""),
    ("code", SETUP),
    ("md", """\
## Clips from shards

`VideoDataModule` streams fixed-length clips: 9 frames at 8 fps, resized to 32 px (the tiny configs' settings).
Training batches are randomly cropped and shuffled; validation batches are centred and come in a fixed order.
Each synthetic sample also carries the ground-truth object positions."""),
    ("code", '''\
from mardini.data.datamodule import VideoDataModule
from mardini.visualize import contact_sheet

shards = testing.synthetic_shards()  # data/shards/synthetic, or a small temp set
print("shards:", shards)
dm = VideoDataModule(train_shards=str(shards / "train"), val_shards=str(shards / "val"), frames=9, fps=8.0,
                     resolution=32, batch_size=4, num_workers=0, shuffle_buffer=16, val_clips=4)
dm.setup("fit")
train_batch = next(iter(dm.train_dataloader()))
val_batch = next(iter(dm.val_dataloader()))
for name, value in val_batch.items():
    print(f"{name:10s}", tuple(value.shape) if torch.is_tensor(value) else value)
contact_sheet(train_batch["video"], None, row_labels=list(train_batch["key"]))'''),
    ("md", """\
The validation clips, centred, with the ground-truth path of every object (`positions`, (x, y) in [0, 1] of the
frame) drawn over their first frame: the trajectory metric of the evaluation compares generated frames with these."""),
    ("code", '''\
import matplotlib.pyplot as plt

from mardini.visualize import to_uint8

video, positions = val_batch["video"], val_batch["positions"]  # (B, T, 3, H, W), (B, T, K, 2)
fig, axes = plt.subplots(1, video.shape[0], figsize=(3 * video.shape[0], 3))
for ax, clip, pos in zip(axes, video, positions):
    size = clip.shape[-1]
    ax.imshow(to_uint8(clip[0]))
    for k in range(pos.shape[1]):  # NaN-padded objects draw nothing
        x, y = pos[:, k, 0] * size - 0.5, pos[:, k, 1] * size - 0.5  # pixel coordinates
        ax.plot(x, y, "w.-", lw=1, ms=3)
        ax.plot(x[:1], y[:1], "wo", ms=5)  # frame 0
    ax.set_axis_off()
fig.suptitle("frame 0 and the objects' paths over the clip (big dot: frame 0)")
plt.show()'''),
    ("md", """\
## The task templates

One mask convention everywhere: a `(B, T)` bool tensor, **True = generate**. The named tasks are masks:
interpolation gives the first and last frames, image-to-video one frame, expansion a prefix. Green cells are
given frames."""),
    ("code", '''\
import numpy as np
from matplotlib.colors import ListedColormap

from mardini.masking import (TEMPLATES, MaskSampler, expansion_mask, image_to_video_mask, interpolation_mask,
                             mask_from_given)

T = 9
named = {
    "interpolation": interpolation_mask(T),
    "image_to_video": image_to_video_mask(T),
    "image_to_video, index=-1": image_to_video_mask(T, index=-1),
    "expansion, 3 given": expansion_mask(T, 3),
    "given [0, 4, 8]": mask_from_given(T, [0, 4, 8]),
}
GIVEN_CMAP = ListedColormap([(0.16, 0.78, 0.24), (0.3, 0.3, 0.3)])  # False = given (green), True = generate


def draw_masks(ax, masks, labels, title):
    ax.imshow(np.asarray(masks, dtype=float), cmap=GIVEN_CMAP, vmin=0, vmax=1)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xticks(range(masks.shape[1]))
    ax.set_xticks(np.arange(-0.5, masks.shape[1]), minor=True)
    ax.set_yticks(np.arange(-0.5, masks.shape[0]), minor=True)
    ax.grid(which="minor", color="black", lw=1)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("frame")
    ax.set_title(title)


fig, ax = plt.subplots(figsize=(6, 2.6))
draw_masks(ax, torch.stack(list(named.values())), list(named), "named task masks (green = given)")
plt.show()'''),
    ("md", """\
The same masks on a real clip: the contact sheet frames given frames in green; the frames to generate are
blanked here to show what the model does not see."""),
    ("code", '''\
clip = val_batch["video"][:1].expand(len(named), -1, -1, -1, -1)  # (5, T, 3, H, W)
masks = torch.stack(list(named.values()))  # (5, T)
shown = torch.where(masks[:, :, None, None, None], torch.full_like(clip, -1.0), clip)
contact_sheet(shown, None, mask=masks, row_labels=list(named))'''),
    ("md", """\
## Training masks: `MaskSampler`

During training each clip draws a template, then its references. `keep_ratio` (the paper's "mask ratio") is the
range of the kept fraction r ~ U[min, max]; `random` places round(r T) references anywhere, `expansion` as a
prefix; interpolation and image-to-video ignore r. Six draws per template at keep_ratio (0.15, 0.6):"""),
    ("code", '''\
g = torch.Generator().manual_seed(0)
fig, axes = plt.subplots(1, len(TEMPLATES), figsize=(3.2 * len(TEMPLATES), 2.6))
for ax, name in zip(axes, TEMPLATES):
    masks, template = MaskSampler((0.15, 0.6), {name: 1.0}).sample(6, T, generator=g)  # (6, T), (6,)
    assert (template == TEMPLATES.index(name)).all() and (~masks).any(1).all() and masks.any(1).all()
    draw_masks(ax, masks, [f"draw {i}" for i in range(6)], name)
plt.tight_layout()
plt.show()'''),
    ("md", """\
## The keep-ratio curriculum

The joint task stage (`configs/tiny/05_joint_task.yaml`) lowers the kept fraction as training goes (from
interpolation-like masks towards image-to-video) and widens the template mix. Its `Curriculum` callback is
rebuilt here from the YAML, and `settings_at(step)` gives what is in force at every step."""),
    ("code", '''\
import yaml

from mardini.lit.curriculum import Curriculum, Milestone

cfg = yaml.safe_load(Path("configs/tiny/05_joint_task.yaml").read_text(encoding="utf-8"))
spec = next(cb["init_args"] for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith("Curriculum"))
curriculum = Curriculum([Milestone(**m) for m in spec["milestones"]], interpolate=spec.get("interpolate", False))
max_steps = cfg["trainer"]["max_steps"]
frames = cfg["model"]["init_args"].get("frames", T)
for m in curriculum.milestones:
    print(f"step {m.step:4d}: keep_ratio={m.keep_ratio} templates={m.templates}")

steps = np.arange(0, max_steps + 1)
ranges = np.array([curriculum.settings_at(int(s))["keep_ratio"] for s in steps], dtype=float)  # (S, 2)
fig, ax = plt.subplots(figsize=(7, 3))
ax.fill_between(steps, ranges[:, 0], ranges[:, 1], alpha=0.35, label="kept fraction range [min, max]")
ax.plot(steps, ranges.mean(1), lw=1, label="mean")
for m in curriculum.milestones:
    ax.axvline(m.step, color="grey", ls=":", lw=1)
    if m.templates:
        mix = ", ".join(f"{k} {v:g}" for k, v in m.templates.items())
        ax.text(m.step + 3, 0.03, mix.replace(", ", "\\n"), fontsize=7, va="bottom")
ax.set(xlabel="training step", ylabel="kept fraction r", ylim=(0, 1.05), title="05_joint_task: keep_ratio vs step")
ax.legend(loc="upper right")
plt.show()'''),
    ("md", """\
What the sampler realises: the number of reference frames (of `frames` = 9) drawn by `MaskSampler` with the
settings in force at a few steps (all templates of the mix, 2000 masks each; 200 in quick mode). Interpolation always gives 2 and
image-to-video 1, so the mass at 1-2 grows as the image-to-video template enters."""),
    ("code", '''\
draws = 200 if QUICK else 2000
probe = np.linspace(0, max_steps, 5).astype(int)
fig, axes = plt.subplots(1, len(probe), figsize=(3 * len(probe), 2.8), sharey=True)
g = torch.Generator().manual_seed(0)
for ax, step in zip(axes, probe):
    s = curriculum.settings_at(int(step))
    sampler = MaskSampler(tuple(s["keep_ratio"]), dict(s["templates"]))
    masks, _ = sampler.sample(draws, frames, generator=g)  # (N, T)
    n_ref = (~masks).sum(1).numpy()  # (N,)
    ax.hist(n_ref, bins=np.arange(0.5, frames), density=True, rwidth=0.85)
    ax.set_title(f"step {step}: r in [{s['keep_ratio'][0]:.2f}, {s['keep_ratio'][1]:.2f}]", fontsize=9)
    ax.set_xlabel(f"given frames (of {frames}); mean {n_ref.mean():.1f}")
axes[0].set_ylabel("share of masks")
plt.tight_layout()
plt.show()'''),
]

# ------------------------------------------------------------------------------------------------
# 02: sampling
# ------------------------------------------------------------------------------------------------
SAMPLING = [
    ("md", """\
# 2. Sampling every task from a checkpoint

`MarDiniPipeline.from_checkpoint` rebuilds the planner, the generator (EMA weights) and the autoencoder of a joint
checkpoint. One general call, `generate(video, mask)`, fills the masked frames of a window; the named tasks build
videos and masks for it. Set `CHECKPOINT` to your own run's `last.ckpt`; the default is what `make demo`
(`make train-tiny`) trains."""),
    ("code", SETUP + '''

CHECKPOINT = "outputs/tiny/05_joint_task/checkpoints/last.ckpt"'''),
    ("md", """\
## Load the checkpoint

If `CHECKPOINT` does not exist (or in quick mode), a tiny joint model is fitted for **one** step on random
clips in a temp folder (a few seconds). It runs every task below, but it is untrained: **its samples are noise**,
not videos. Train with `make demo` for a model that works."""),
    ("code", '''\
from mardini.pipeline import MarDiniPipeline

ckpt, trained = testing.checkpoint_or_tiny(CHECKPOINT)
if not trained:
    print(f"NOTE: {CHECKPOINT} not used; sampling from an UNTRAINED 1-step tiny checkpoint ({ckpt}).\\n"
          "      Its samples are noise: this only shows the calls. Run `make demo` for a trained model.")
STEPS, ETA = (5, 1.0) if trained else (2, 0.0)  # the demo's sampler for its checkpoint: 5 DDIM steps, ancestral
pipe = MarDiniPipeline.from_checkpoint(ckpt)
T = pipe.window
SIZE = pipe.resolution[0] if pipe.resolution else 32
FPS = pipe.fps or 8.0
print(pipe.info, "| window", T, "frames at", SIZE, "px,", FPS, "fps |", STEPS, "steps, eta", ETA)'''),
    ("md", """\
## Clips to condition on

Held-out synthetic clips (the validation split, centred) at the checkpoint's window, size and frame rate, and
the same clips at twice the frame rate over 2T - 1 frames (the ground truth of slow motion)."""),
    ("code", '''\
import tempfile

from IPython.display import HTML, Image, display

from mardini.data.datamodule import VideoDataModule
from mardini.visualize import contact_sheet, save_gif

N = 2 if QUICK else 4
shards = testing.synthetic_shards()


def clips(frames, fps):
    dm = VideoDataModule(train_shards=str(shards / "train"), val_shards=str(shards / "val"), frames=frames,
                         fps=fps, resolution=SIZE, batch_size=N, num_workers=0, val_clips=N)
    dm.setup("validate")
    return next(iter(dm.val_dataloader()))["video"]  # (N, frames, 3, SIZE, SIZE)


real = clips(T, FPS)  # (N, T, 3, H, W)
real_fast = clips(2 * T - 1, 2 * FPS)  # (N, 2T - 1, 3, H, W) at 2 x FPS; real_fast[:, ::2] == real
GIFS = Path(tempfile.mkdtemp(prefix="mardini_gifs_"))


def show(rows, masks=None, labels=None):
    """Contact sheet of (B, T, 3, H, W) videos; given frames (mask False) framed in green."""
    display(contact_sheet(rows, None, mask=masks, row_labels=labels))


def gif(name, *videos):
    """One looping GIF of videos (T, 3, H, W) placed side by side."""
    path = save_gif(torch.cat(videos, dim=-1), GIFS / f"{name}.gif", fps=FPS)
    display(Image(filename=str(path)))


show(real, labels=[f"clip {i}" for i in range(N)])'''),
    ("md", """\
## `generate`: any mask

The general call: here frames 0, 4 and 8 are given (a custom mask built with `mask_from_given`) and the rest
is generated. Given frames come back bit-identical. Rows: ground truth, then the sample."""),
    ("code", '''\
from mardini.masking import mask_from_given

mask = mask_from_given(T, [0, T // 2, T - 1])[None].expand(N, -1)  # (N, T) True = generate
out = pipe.generate(real, mask, steps=STEPS, eta=ETA, seed=0, progress=False)  # (N, T, 3, H, W)
assert torch.equal(out[~mask], real[~mask])  # given frames are the inputs
rows = torch.stack([real[0], out[0]])
show(rows, torch.stack([mask[0], mask[0]]), ["truth", "generate"])
gif("generate", real[0], out[0])
print("seconds per stage:", {k: round(v, 3) for k, v in pipe.last_timings.items()})'''),
    ("md", """\
## Interpolation

First and last frames given, the 7 between generated (the paper uses no guidance here)."""),
    ("code", '''\
from mardini.masking import image_to_video_mask, interpolation_mask

out = pipe.interpolate(real[:, 0], real[:, -1], steps=STEPS, eta=ETA, progress=False)  # (N, T, 3, H, W)
m = interpolation_mask(T)
show(torch.cat([real, out]), m.expand(2 * N, -1), [f"truth {i}" for i in range(N)] + [f"interp {i}" for i in range(N)])
gif("interpolate", real[0], out[0])'''),
    ("md", """\
## Inside a run: the plan and the frames forming

`pipe.plan(video, mask)` is the planning signal the generator reads: one token per planner patch of each frame's
low-resolution copy. A `callback` passed to `generate` (or any task) gets a `DenoisingStep` after every denoising
step, with the whole batch's state `latents` and the step's clean estimate `estimate`; `pipe.decode` turns either
into frames. Rows: each step's clean estimate, the last one being the sample."""),
    ("code", '''\
plan = pipe.plan(real, m.expand(N, -1))  # (N, T, N_low, D)
similar = torch.nn.functional.cosine_similarity(plan[0].flatten(1), plan[0, :1].flatten(1))  # (T,) vs frame 0
print(f"plan {tuple(plan.shape)}; clip 0's frames against its first:", [round(float(c), 2) for c in similar])

seen = []  # one DenoisingStep per step
out = pipe.interpolate(real[:1, 0], real[:1, -1], steps=STEPS, eta=ETA, progress=False, callback=seen.append)
estimates = torch.cat([pipe.decode(s.estimate).clamp(-1, 1) for s in seen])  # (STEPS, T, 3, H, W)
assert torch.equal(pipe.decode(seen[-1].latents)[0, 1:-1], out[0, 1:-1])  # the last state is the sample
show(estimates, m.expand(len(seen), -1), [f"x0, step {s.index + 1}" for s in seen])'''),
    ("md", """\
## Image-to-video

One frame given (the first), the rest generated, with classifier-free guidance 2.5 on the plan (the paper's
setting for image-to-video). Two samples per image (`num_samples=2`) show the model's spread."""),
    ("code", '''\
out = pipe.image_to_video(real[:, 0], guidance_scale=2.5, num_samples=2, steps=STEPS, eta=ETA, progress=False)  # (2N, T, ...)
m = image_to_video_mask(T)
show(out, m.expand(out.shape[0], -1), [f"clip {i // 2} s{i % 2}" for i in range(out.shape[0])])
gif("image_to_video", real[0], out[0], out[1])'''),
    ("md", """\
## Expansion

A 3-frame prefix given, continued to the end of the window."""),
    ("code", '''\
from mardini.masking import expansion_mask

out = pipe.expand(real[:, :3], steps=STEPS, eta=ETA, progress=False)  # (N, T, 3, H, W)
show(torch.cat([real[:1], out[:1]]), expansion_mask(T, 3).expand(2, -1), ["truth", "expand"])
gif("expand", real[0], out[0])'''),
    ("md", """\
## Long video

Autoregressive expansion past the trained window: each window gives the last `context` frames so far and
generates the rest, until `total_frames`. Here the first 2 frames of each clip grow to 2T - 1 (past the
window, so there is no ground truth to show beside it)."""),
    ("code", '''\
total = 2 * T - 1
out = pipe.long_video(real[:, :2], total_frames=total, context=T // 2, steps=STEPS, eta=ETA, progress=False)
assert out.shape[1] == total and torch.equal(out[:, :2], real[:, :2])
generated = torch.arange(total) >= 2
show(out, generated.expand(N, -1), [f"long {i}" for i in range(N)])
gif("long_video", out[0])'''),
    ("md", """\
## Any mask past the window

`generate_long(video, mask)` samples any mask over more frames than a window, window by window: each window
has the trained length, gives the frames known so far (given, or generated by an earlier window) and generates
the rest; frames after the first given one go forward, frames before it backward. Here the first and last frames
of the 2T - 1-frame clips at twice the rate are given, two windows apart, and the frames between generated."""),
    ("code", '''\
from mardini.pipeline.tasks import window_schedule

keys = interpolation_mask(2 * T - 1)  # (2T - 1,) True = generate: the first and last frames given
for start, wm in window_schedule(keys, T, T // 2):  # the default context: half the window
    print(f"window from frame {start}: gives {[start + i for i in (~wm).nonzero().flatten().tolist()]}")
out = pipe.generate_long(real_fast, keys, steps=STEPS, eta=ETA, progress=False)  # (N, 2T - 1, 3, H, W)
assert torch.equal(out[:, ~keys], real_fast[:, ~keys])  # given frames are the inputs
show(torch.cat([real_fast[:1], out[:1]]), keys.expand(2, -1), ["truth (2 x FPS)", "generate_long"])'''),
    ("md", """\
## Slow motion

Hierarchical interpolation: a clip at the model's frame rate goes in, one frame is generated between each pair
of neighbours (`factor=2`), window by window, doubling the frame rate. The truth row is the same clip at twice
the rate."""),
    ("code", '''\
slow = real_fast[:, ::2]  # (N, T, 3, H, W) at FPS
out = pipe.slow_motion(slow, factor=2, steps=STEPS, eta=ETA, progress=False)  # (N, 2T - 1, 3, H, W) at 2 x FPS
assert out.shape[1] == real_fast.shape[1] and torch.equal(out[:, ::2], slow)
generated = torch.arange(out.shape[1]) % 2 == 1
show(torch.cat([real_fast[:1], out[:1]]), generated.expand(2, -1), ["truth", "slow motion"])
gif("slow_motion", real_fast[0], out[0])'''),
    ("md", """\
GIFs are written to a temp folder; `sample.py` (see the README) writes MP4s, GIFs and contact sheets for each
task from the command line."""),
    ("code", '''\
HTML(f"<p>GIFs of this run: <code>{GIFS}</code> ({len(list(GIFS.glob('*.gif')))} files)</p>")'''),
]

# ------------------------------------------------------------------------------------------------
# 03: evaluation
# ------------------------------------------------------------------------------------------------
EVALUATION = [
    ("md", """\
# 3. Evaluation against the baselines

The synthetic protocol of `mardini/evaluation` (see its README): interpolation (first + last frame of the window
given) and image-to-video (first given) on held-out synthetic clips at the checkpoint's window, size and frame
rate (the tiny configs: 9 frames at 32 px, 8 fps), every method on the same clips, masks and seeds. Baselines:
`linear_blend` (blend of the nearest given frames in time) and `nearest_frame` (repeat the nearest given frame). Metrics: MidF-PSNR/SSIM (the middle frame) and the trajectory error of the synthetic
objects; FVD/FID join in when their weights are present (`make weights`) and not in quick mode."""),
    ("code", SETUP + '''

CHECKPOINT = "outputs/tiny/05_joint_task/checkpoints/last.ckpt"'''),
    ("md", """\
## Checkpoint, data, metrics

The model is evaluated from `CHECKPOINT`; if it does not exist (or in quick mode) a 1-step **untrained** tiny
checkpoint stands in, which shows the calls but samples noise, so it loses to both baselines. The window, size and
frame rate of the clips are the checkpoint's (`pipe.window`, `pipe.resolution`, `pipe.fps`)."""),
    ("code", '''\
from mardini.evaluation.data import count_clips, resolve_source
from mardini.pipeline import MarDiniPipeline
from mardini.weights import resolve_weights

ckpt, trained = testing.checkpoint_or_tiny(CHECKPOINT)
MODEL = "mardini" if trained else "mardini (untrained stand-in)"
if not trained:
    print(f"NOTE: {CHECKPOINT} not used; the model is an UNTRAINED 1-step tiny checkpoint: expect noise.")
STEPS, ETA = (5, 1.0) if trained else (2, 0.0)  # the demo's sampler for its checkpoint: 5 DDIM steps, ancestral
pipe = MarDiniPipeline.from_checkpoint(ckpt)
T = pipe.window
SIZE = pipe.resolution[0] if pipe.resolution else 32
FPS = pipe.fps or 8.0
shards = testing.synthetic_shards()
kind, files = resolve_source(str(shards / "val"))
NUM_CLIPS = min(64 if trained and not QUICK else 8, count_clips(kind, files))  # few clips for a stand-in

metrics = ["midf", "traj"]
try:
    resolve_weights("i3d"), resolve_weights("inception")
    metrics += [] if QUICK else ["fvd", "fid"]
except FileNotFoundError as err:
    print("FVD/FID left out:", str(err).splitlines()[0])
print(f"{NUM_CLIPS} clips from {shards / 'val'}; metrics {metrics}; model {ckpt} ({STEPS} steps, eta {ETA})")
print(f"window {T} frames at {SIZE} px, {FPS} fps")'''),
    ("md", """\
## Run the protocol

`mardini.evaluation.cli.main` is `python evaluate.py`: the same flags, and the same report (`report.md`,
`report.json`; in `outputs/notebooks/eval/`, a temp folder in quick mode). The real statistics cache is off here
(`--cache-dir ''`)."""),
    ("code", '''\
import contextlib
import io
import json
import tempfile

from IPython.display import Markdown, display

from mardini.evaluation import cli

out = Path(tempfile.mkdtemp(prefix="mardini_eval_")) if QUICK else Path("outputs/notebooks/eval")
argv = ["--data", str(shards / "val"), "--frames", str(T), "--resolution", str(SIZE), "--fps", str(FPS),
        "--num-clips", str(NUM_CLIPS), "--batch-size", "4", "--metrics", *metrics, "--steps", str(STEPS),
        "--eta", str(ETA), "--checkpoint", str(ckpt), "--device", "cpu", "--out", str(out), "--cache-dir", ""]
log = io.StringIO()
with contextlib.redirect_stdout(log):  # the report is shown below
    assert cli.main(argv) == 0, log.getvalue()
report = json.loads((out / "report.json").read_text(encoding="utf-8"))'''),
    ("md", """\
## The report

The same table `evaluate.py` writes, per task, methods as rows (arrows: which way is better)."""),
    ("code", '''\
display(Markdown((out / "report.md").read_text(encoding="utf-8")))'''),
    ("md", """\
## Model against the baselines

One bar chart per metric and task. PSNR, SSIM and `traj_detected` are better higher; the errors (and FVD/FID)
lower. Read the trajectory error with its detection rate: a blend makes half-transparent ghosts that are not
detected, so `linear_blend` can show a low error over few detections."""),
    ("code", '''\
import matplotlib.pyplot as plt

COLORS = {"linear_blend": "tab:grey", "nearest_frame": "tab:brown", "mardini": "tab:blue"}
for task, res in report["tasks"].items():
    results = res["results"]  # {method: {metric: value}}
    names = sorted({k for r in results.values() for k in r})
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        methods = list(results)
        values = [results[m].get(name, float("nan")) for m in methods]
        labels = [MODEL if m == "mardini" else m for m in methods]
        ax.bar(range(len(methods)), values, color=[COLORS.get(m, "tab:blue") for m in methods])
        ax.set_xticks(range(len(methods)), [lbl.replace(" ", "\\n", 1) for lbl in labels], fontsize=7, rotation=30)
        ax.set_title(f"{name} {cli.ARROWS.get(name.split('_')[-1], '↓')}", fontsize=9)
    fig.suptitle(f"{task}: {res['clips']} clips, {STEPS} DDIM steps")
    plt.tight_layout()
    plt.show()'''),
    ("md", """\
## Where are the objects lost?

The trajectory metric split by each generated frame's distance from its nearest given frame
(`mardini.evaluation.found_by_gap`; as a command `python -m mardini.evaluation.found_by_gap --checkpoint
CHECKPOINT`), interpolation on the same held-out clips with the sampler above. Objects lost next to a given frame,
where a copy of it finds nearly all of them, are objects the model cannot yet draw from noise; objects lost only
further away are a motion problem."""),
    ("code", '''\
from mardini.data.datamodule import first_batch
from mardini.evaluation.found_by_gap import markdown, score_methods
from mardini.masking import interpolation_mask

clips = first_batch(str(shards / "val"), NUM_CLIPS, frames=T, resolution=SIZE, fps=FPS)  # video, positions
gap_mask = interpolation_mask(T)[None].expand(NUM_CLIPS, -1)  # (B, T): first and last frames given
by_gap = score_methods(pipe, clips["video"], clips["positions"], gap_mask,
                       steps=STEPS, eta=ETA)  # the protocol's sampler above
display(Markdown(markdown(by_gap)))
fig, ax = plt.subplots(figsize=(4.5, 3))
for method, rows in by_gap.items():
    ax.plot([r["gap"] for r in rows], [r["found"] for r in rows], "o-", color=COLORS.get(method),
            label=MODEL if method == "mardini" else method)
ax.set(xlabel="frames from the nearest given frame", ylabel="objects found", ylim=(0, 1.05))
ax.legend(fontsize=7)
plt.tight_layout()
plt.show()'''),
    ("md", """\
With the demo's trained checkpoint and the demo's sampler (5 DDIM steps, eta 1) these are the figures of the demo's
report: the model beats both baselines on interpolation MidF-PSNR and SSIM, and not the nearest frame on the
trajectory error, losing many objects even next to a given frame (README, the demo; with the paper's 25
deterministic steps it also falls below the blend's PSNR); the untrained stand-in loses on every metric. For the full protocol (more clips, FVD/FID):
`python evaluate.py --preset synthetic --checkpoint CHECKPOINT` (`make evaluate ARGS=...`)."""),
]

NOTEBOOKS = {
    "01_data_and_masks.ipynb": DATA_AND_MASKS,
    "02_sampling.ipynb": SAMPLING,
    "03_evaluation.ipynb": EVALUATION,
}


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells])
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    }
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: a rebuild gives the same file
    nbformat.validate(nb)
    return nb


def execute(out: Path) -> None:
    """Run the committed notebooks (cwd = the repository root) and write the executed copies to ``out``."""
    from nbclient import NotebookClient

    out.mkdir(parents=True, exist_ok=True)
    for name in NOTEBOOKS:
        nb = nbformat.read(HERE / name, as_version=4)
        print("running", HERE / name, flush=True)
        NotebookClient(nb, timeout=1800, kernel_name="python3",
                       resources={"metadata": {"path": str(HERE.parent)}}).execute()
        nbformat.write(nb, out / name)
        print("wrote", out / name, flush=True)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--execute", metavar="OUT", type=Path, default=None,
                   help="run the notebooks and write the executed copies to OUT (the committed ones stay clean)")
    args = p.parse_args(argv)
    if args.execute is not None:
        execute(args.execute)
        return
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(cells), HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
