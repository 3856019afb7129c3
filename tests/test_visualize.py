"""Contact sheets, GIFs and MP4s."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mardini.data.decode import decode_mp4
from mardini.visualize import GENERATED_COLOR, GIVEN_COLOR, contact_sheet, gif_durations, save_gif, save_mp4


def test_contact_sheet_layout_and_given_frame_borders(tmp_path):
    video = torch.zeros(2, 3, 3, 16, 16)  # grey frames
    video[1] = 1.0  # white row
    mask = torch.tensor([[False, True, False], [True, True, False]])
    path = contact_sheet(video, tmp_path / "sheet.png", mask=mask, min_cell=32, border=2)
    img = np.asarray(Image.open(path))
    cell, gap = 32 + 4, 2
    assert img.shape == (2 * (cell + gap) + gap, 3 * (cell + gap) + gap, 3)
    for i in range(2):
        for j in range(3):
            y, x = gap + i * (cell + gap), gap + j * (cell + gap)
            want = GENERATED_COLOR if mask[i, j] else GIVEN_COLOR
            assert tuple(img[y, x + cell // 2]) == want
            centre = img[y + cell // 2, x + cell // 2]
            assert tuple(centre) == ((128,) * 3 if i == 0 else (255,) * 3)
    labelled = np.asarray(Image.open(contact_sheet(video, tmp_path / "l.png", row_labels=["a", "bb"])))
    assert labelled.shape[1] > img.shape[1]
    with pytest.raises(ValueError, match="mask"):
        contact_sheet(video, tmp_path / "x.png", mask=mask[:, :2])


def test_gif_and_mp4(tmp_path):
    video = torch.linspace(-1, 1, 5)[:, None, None, None].expand(5, 3, 15, 21).contiguous()  # odd size
    gif = Image.open(save_gif(video, tmp_path / "a.gif", fps=5))
    assert gif.n_frames == 5 and gif.size == (21, 15)
    frames = decode_mp4((save_mp4(video, tmp_path / "a.mp4", fps=5)).read_bytes())
    assert frames.shape == (5, 16, 22, 3)  # padded to even
    assert np.all(np.diff(frames[:, 5, 5, 0].astype(int)) > 0)  # brightness rises frame by frame


def test_gif_plays_at_its_fps_on_average(tmp_path):
    assert gif_durations(4, 8.0) == [130, 120, 130, 120]  # GIF stores hundredths: one 125-ms delay would be 120
    assert sum(gif_durations(16, 8.0)) == 2000 and gif_durations(3, 5.0) == [200, 200, 200]
    video = torch.linspace(-1, 1, 8)[:, None, None, None].expand(8, 3, 6, 6).contiguous()
    gif = Image.open(save_gif(video, tmp_path / "b.gif", fps=8))
    delays = []
    for i in range(gif.n_frames):
        gif.seek(i)
        delays.append(gif.info["duration"])
    assert sum(delays) == 1000  # 8 frames at 8 fps: one second


def test_gif_keeps_repeated_frames_at_pillow_s_quality(tmp_path):
    """Pillow's GIF writer merged identical consecutive frames: 8 frames, 3 alike in a row, read back as 6."""
    from PIL import ImageSequence

    video = torch.rand(8, 3, 12, 20, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (T, 3, H, W), rich colours
    video[3:5] = video[2]  # frames 2, 3, 4 identical
    with Image.open(save_gif(video, tmp_path / "r.gif", fps=8)) as gif:
        frames = [(np.asarray(f.convert("RGB")), f.info["duration"]) for f in ImageSequence.Iterator(gif)]
        assert gif.info["loop"] == 0
    assert [d for _, d in frames] == gif_durations(8, 8.0)  # every frame, each with its own delay
    for (got, _), want in zip(frames, video):
        pixels = ((want.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()  # (H, W, 3)
        quantized = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE).convert("RGB")
        assert np.array_equal(got, np.asarray(quantized))  # the adaptive palette Pillow's writer gave each frame
