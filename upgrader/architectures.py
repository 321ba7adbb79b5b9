"""The upgrader architectures: 8x8 RGB in [0, 1] -> 32x32 RGB in [0, 1].

Every architecture is registered by name; the names are public API (they are
written into each stored manifest and the service rebuilds models from them).
The trainer and the service both build models only through `build_model`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

INPUT_SIZE = 8
OUTPUT_SIZE = 32
CHANNELS = 3
INPUT_SHAPE = (CHANNELS, INPUT_SIZE, INPUT_SIZE)
OUTPUT_SHAPE = (CHANNELS, OUTPUT_SIZE, OUTPUT_SIZE)

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} registered twice")
        ARCHITECTURES[name] = factory
        return factory

    return wrap


def build_model(name: str, **params) -> nn.Module:
    """Build a freshly initialised model of a registered architecture."""
    try:
        factory = ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None
    return factory(**params)


def fully_convolutional(name: str) -> bool:
    """Whether an architecture treats an 8x8 tile the same wherever it sits (only convolutions and
    upsampling, no flatten or global pooling): such models may run on overlapping tiles of a larger
    image, blended, so no seams show; the others are run on plain, abutting tiles."""
    try:
        return bool(getattr(ARCHITECTURES[name], "fully_convolutional", False))
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register("fc")
class FullyConnectedUpgrader(nn.Module):
    """Flatten -> 512-256-128-64 bottleneck -> 128-256-512 -> 3072 pixels."""

    def __init__(self) -> None:
        super().__init__()
        widths = [CHANNELS * INPUT_SIZE**2, 512, 256, 128, 64, 128, 256, 512]
        layers: list[nn.Module] = [nn.Flatten()]
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU(inplace=True)]
        layers += [nn.Linear(widths[-1], CHANNELS * OUTPUT_SIZE**2), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1, *OUTPUT_SHAPE)


@register("conv")
class ConvUpgrader(nn.Module):
    """Two conv+pool stages down to 128x2x2, then four transposed convs up to 32x32."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 2, stride=2), nn.ReLU(inplace=True),  # 4x4
            nn.ConvTranspose2d(64, 32, 2, stride=2), nn.ReLU(inplace=True),  # 8x8
            nn.ConvTranspose2d(32, 3, 3, stride=2, padding=1, output_padding=1), nn.ReLU(inplace=True),  # 16x16
            nn.ConvTranspose2d(3, 3, 3, stride=2, padding=1, output_padding=1), nn.Sigmoid(),  # 32x32
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@register("resnet18")
class ResNet18Upgrader(nn.Module):
    """torchvision ResNet-18 encoder (3x3 stride-1 stem) to 512x1x1, transposed-conv decoder."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet18

        backbone = resnet18(weights=None)  # never pretrained: nothing is downloaded
        backbone.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=True)
        # Everything up to (not including) avgpool/fc: 8x8 -> maxpool 4x4 -> 4,2,1,1.
        self.encoder = nn.Sequential(*list(backbone.children())[:-2])
        layers: list[nn.Module] = []
        for c_in, c_out in [(512, 256), (256, 128), (128, 64), (64, 32)]:
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(32, 3, 4, stride=2, padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class _RepConv3x3(nn.Module):
    """A 3x3 conv trained as two parallel branches (3x3 and 1x1), run as the one 3x3 conv they sum to.

    Re-parameterisation as in RepVGG / ECBSR, without BatchNorm: the branches are linear, so their
    sum *is* a single 3x3 kernel, built from the branch weights on every forward (a 64x64x3x3 add,
    nothing next to the convolution itself). Training sees the multi-branch parameterisation (its
    gradients differ from a plain conv's), inference costs exactly one conv, and there is no
    separate "deploy" model to convert. RepVGG's identity branch is left out: inside a residual
    block it doubled the features at every conv and an 8-block body diverged in training.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.conv1 = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.conv3.weight + nn.functional.pad(self.conv1.weight, (1, 1, 1, 1))
        return nn.functional.conv2d(x, kernel, self.conv3.bias + self.conv1.bias, padding=1)


class _ChannelAttention(nn.Module):
    """RCAN's channel attention: global average pool -> bottleneck MLP -> sigmoid gate per channel."""

    def __init__(self, width: int, reduction: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(width, max(width // reduction, 1), 1)
        self.excite = nn.Conv2d(max(width // reduction, 1), width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        return x * gate


class _GlobalAttention(nn.Module):
    """A pre-norm transformer block over the 64 positions of the 8x8 feature map: every position
    attends to every other, where a 3x3 conv mixes neighbours. It adds the image-wide context a
    CIFAR-10 object needs (which side is sky, what the silhouette is) at about the cost of one
    64-wide 3x3 conv. No position embedding: the convolutions before it already encode where each
    feature sits (the zero-padded borders), and it keeps the block indifferent to which 8x8 tile it sees.

    Both residual branches end in a projection that starts at zero, so a freshly built block is the
    identity: a trained model grown by these blocks (`--init-from` a version without them) starts
    with exactly that version's outputs.
    """

    def __init__(self, width: int, heads: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"global attention: width {width} is not a multiple of {heads} heads")
        self.heads, self.head_dim = heads, width // heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp_in = nn.Linear(width, 2 * width)
        self.mlp_out = nn.Linear(2 * width, width)
        for last in (self.proj, self.mlp_out):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (b, h*w, c)
        q, k, v = self.qkv(self.norm1(tokens)).view(b, -1, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mixed = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        tokens = tokens + self.proj(mixed)
        tokens = tokens + self.mlp_out(nn.functional.gelu(self.mlp_in(self.norm2(tokens))))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class _ResidualBlock(nn.Module):
    """EDSR block: conv-ReLU-conv without BatchNorm, scaled before it is added back.

    Options (off by default, so existing manifests rebuild the same model): `rep` trains each conv
    as a re-parameterisable 3x3+1x1 pair, `attention` > 0 gates the block's output by RCAN
    channel attention with that reduction ratio.
    """

    def __init__(self, width: int, res_scale: float, rep: bool = False, attention: int = 0) -> None:
        super().__init__()
        make_conv = (lambda: _RepConv3x3(width)) if rep else (lambda: nn.Conv2d(width, width, 3, padding=1))
        self.conv1 = make_conv()
        self.conv2 = make_conv()
        self.attention = _ChannelAttention(width, attention) if attention > 0 else nn.Identity()
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.conv2(torch.relu(self.conv1(x)))) * self.res_scale


@register("subpixel_residual")
class SubpixelResidualUpgrader(nn.Module):
    """Learns what bicubic misses: bicubic(x) + a residual made entirely at 8x8.

    EDSR-style body (residual blocks, no BatchNorm, a long skip; `res_scale` < 1
    steadies very wide bodies, at this size 1 trained measurably faster than 0.1)
    on the 8x8 input, then one ESPCN sub-pixel convolution straight to 3x32x32:
    a conv to 3*4*4 channels rearranged by PixelShuffle(4). Every 3x3 conv runs
    on 64 positions, which is what keeps it fast on a CPU. The last conv starts at
    zero, so an untrained model is exactly bicubic and training only adds detail.

    Defaults (48 wide, 6 blocks, 292k parameters, ~19 MMAC per image) were chosen
    on equal CPU-second training budgets against 32x4 and 64x8: as good as 64x8
    at under half its inference cost, and ahead of 32x4 once training runs longer.
    `global_attention` = N adds N transformer blocks over the 64 positions after the
    body (off by default; see `_GlobalAttention`). `refine` = N adds N residual blocks
    after the long skip, whose last conv starts at zero: a trained model grows deeper
    (`--init-from`) starting from exactly its own outputs, with no state-dict name moved.
    """

    # No layer knows where in a larger image its 8x8 tile sits (convolutions, pixel shuffle, bicubic; the optional
    # attentions pool or attend within the tile, with no position embedding): see `fully_convolutional()`.
    fully_convolutional = True

    def __init__(self, width: int = 48, depth: int = 6, res_scale: float = 1.0, rep: bool = False, attention: int = 0,
                 global_attention: int = 0, refine: int = 0) -> None:
        super().__init__()
        # Imported here because upgrader.imaging imports this module's sizes.
        from upgrader.imaging import bicubic_upscale

        self.bicubic_upscale = bicubic_upscale
        scale = OUTPUT_SIZE // INPUT_SIZE
        self.head = nn.Conv2d(CHANNELS, width, 3, padding=1)
        self.body = nn.Sequential(
            *(_ResidualBlock(width, res_scale, rep, attention) for _ in range(depth)),
            nn.Conv2d(width, width, 3, padding=1),
        )
        # Both off by default (0 blocks), so existing manifests rebuild the same model and state dict.
        self.refine = nn.Sequential(*(_ResidualBlock(width, res_scale, rep, attention) for _ in range(refine)))
        for block in self.refine:
            for tensor in block.conv2.parameters():  # the branch adds zero: a new block is the identity
                nn.init.zeros_(tensor)
        self.context = nn.Sequential(*(_GlobalAttention(width) for _ in range(global_attention)))
        self.to_subpixels = nn.Conv2d(width, CHANNELS * scale**2, 3, padding=1)
        nn.init.zeros_(self.to_subpixels.weight)
        nn.init.zeros_(self.to_subpixels.bias)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x)
        features = self.context(self.refine(features + self.body(features)))
        residual = self.shuffle(self.to_subpixels(features))
        return (self.bicubic_upscale(x) + residual).clamp(0, 1)


@register("photo_residual")
class PhotoResidualUpgrader(nn.Module):
    """x4 super-resolution of whole photographs of any size: H x W in, 4H x 4W out, in one forward.

    The same design as `subpixel_residual` (bicubic + a residual computed entirely at low resolution): a
    3x3 head, an EDSR body of `depth` residual blocks (conv-ReLU-conv, no BatchNorm) with a long skip, and
    an ESPCN tail (one conv to 3 * 4 * 4 channels, PixelShuffle(4)) whose weights start at zero, so an
    untrained model is exactly bicubic. Only convolutions, no attention or pooling: every output pixel sees
    a fixed window of 2 * depth + 3 input pixels (19 at depth 8), so the cost grows linearly with the image
    and an image cut into overlapping tiles gives the same result away from the tiles' borders.

    The bicubic skip uses a scale factor, not a fixed size (PyTorch's antialiased bicubic: Keys' kernel with
    a = -0.5, as MATLAB's and PIL's). The state-dict names of head, body and to_subpixels are those of
    `subpixel_residual`, so its trained weights (same width) can start this model.
    """

    fully_convolutional = True

    def __init__(self, width: int = 64, depth: int = 8, scale: int = 4, res_scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.head = nn.Conv2d(CHANNELS, width, 3, padding=1)
        self.body = nn.Sequential(
            *(_ResidualBlock(width, res_scale) for _ in range(depth)),
            nn.Conv2d(width, width, 3, padding=1),
        )
        self.to_subpixels = nn.Conv2d(width, CHANNELS * scale**2, 3, padding=1)
        nn.init.zeros_(self.to_subpixels.weight)
        nn.init.zeros_(self.to_subpixels.bias)
        self.shuffle = nn.PixelShuffle(scale)

    def bicubic(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, scale_factor=self.scale, mode="bicubic", antialias=True, align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x)
        residual = self.shuffle(self.to_subpixels(features + self.body(features)))
        return (self.bicubic(x) + residual).clamp(0, 1)
