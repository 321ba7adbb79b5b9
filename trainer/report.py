"""The two pictures published with every model: loss_curve.png and samples.png (PNG bytes).

Drawn on bare matplotlib Figures (Agg canvas, no pyplot state), so this works
headless and in any thread.
"""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from upgrader.imaging import psnr_per_image


PADDING = 2  # pixels of white between sample tiles


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def loss_curve_png(history: list[dict], *, title: str, loss_name: str, bicubic_psnr: float) -> bytes:
    """Train and validation loss per epoch, and validation PSNR against the bicubic baseline."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, psnr_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel=f"{loss_name} loss", title="loss")
    loss_ax.legend()
    psnr_ax.plot(epochs, [h["val_psnr"] for h in history], "o-", color="tab:orange", label="model")
    psnr_ax.axhline(bicubic_psnr, color="gray", linestyle="--", label=f"bicubic {bicubic_psnr:.2f} dB")
    psnr_ax.set(xlabel="epoch", ylabel="dB", title="validation PSNR")
    psnr_ax.legend()
    for ax in (loss_ax, psnr_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    return _png(fig)


def samples_png(inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor, bicubic: torch.Tensor, *, title: str) -> bytes:
    """One row per image: the 8x8 input (enlarged, nearest), the original, the model's output, bicubic.

    The tiles go into one image (one imshow, not an axes per tile: ~10x faster to draw);
    the model and bicubic tiles carry their PSNR against the original.
    """
    columns = {
        "8x8 input": F.interpolate(inputs, size=targets.shape[-2:], mode="nearest"),
        "original": targets,
        "model": outputs,
        "bicubic": bicubic,
    }
    psnr = {"model": psnr_per_image(outputs, targets), "bicubic": psnr_per_image(bicubic, targets)}
    tiles = torch.stack(list(columns.values()), dim=1).flatten(0, 1)  # row-major: image 0's 4 tiles, image 1's, ...
    grid = make_grid(tiles.detach().float().clamp(0, 1).cpu(), nrow=len(columns), padding=PADDING, pad_value=1.0)
    rows, size = len(targets), targets.shape[-1]
    step = size + PADDING
    fig = Figure(figsize=(len(columns) * 1.3, rows * 1.3 + 0.8), layout="constrained")
    ax = fig.subplots()
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([PADDING + step * c + size / 2 for c in range(len(columns))], list(columns), fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    for row in range(rows):
        for column, name in enumerate(columns):
            if name in psnr:
                ax.text(PADDING + step * column + 1, PADDING + step * row + size - 1.5, f"{psnr[name][row]:.1f} dB",
                        fontsize=6, color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})
    fig.suptitle(title, fontsize=9)
    return _png(fig)
