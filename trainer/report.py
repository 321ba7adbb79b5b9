"""The two pictures published with every model: loss_curve.png and samples.png (PNG bytes).

Drawn on bare matplotlib Figures (Agg canvas, no pyplot state), so this works
headless and in any thread.
"""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from upgrader.imaging import psnr_per_image


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
    """One row per image: the 8x8 input (enlarged, nearest), the original, the model's output, bicubic."""
    enlarged = F.interpolate(inputs, size=targets.shape[-2:], mode="nearest")
    model_psnr, bicubic_psnr = psnr_per_image(outputs, targets), psnr_per_image(bicubic, targets)
    rows = len(targets)
    fig = Figure(figsize=(4 * 1.6, rows * 1.6 + 0.4), layout="constrained")
    axes = fig.subplots(rows, 4, squeeze=False)
    for i in range(rows):
        columns = [
            (enlarged[i], "8x8 input"),
            (targets[i], "original"),
            (outputs[i], f"model {model_psnr[i]:.1f} dB"),
            (bicubic[i], f"bicubic {bicubic_psnr[i]:.1f} dB"),
        ]
        for ax, (image, label) in zip(axes[i], columns):
            ax.imshow(image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_title(label, fontsize=8)
            ax.set_axis_off()
    fig.suptitle(title)
    return _png(fig)
