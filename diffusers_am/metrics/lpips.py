"""LPIPS (Zhang et al., 2018, v0.1) in plain torch: no torchvision, no lpips package.

d(x, y) = sum_l mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 ), with f_l the ReLU outputs of an
ImageNet trunk (AlexNet: relu1..relu5; VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) on
inputs mapped to [-1, 1] and shifted/scaled by LPIPS's constants, n the unit-norm over channels
and w_l the learned 1x1 "lin" weights. Inputs: images [B, C, H, W] in [0, 1] (grey repeated).

Weights, two files (nothing downloads):
  * the trunk, torchvision's file with its key layout (``features.<i>.weight/bias``; the
    ``classifier.*`` keys are ignored): ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``,
    looked up in ``$TORCH_HOME/hub/checkpoints/`` (``torch.hub.get_dir()``);
  * the lin layers, the lpips package's ``weights/v0.1/{alex,vgg}.pth`` (keys
    ``lin<l>.model.1.weight``), looked up as ``lpips_v0.1_{alex,vgg}.pth`` in the same folder or in
    an installed ``lpips`` package.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..checks import one_of
from ..rewards.checkpoints import check_keys, torch_load, unwrap_state_dict
from ..rewards.base import check_images

# net -> (torchvision layout of `features` as (kind, args), indices after which a tapped ReLU sits)
_ALEX = [("conv", 3, 64, 11, 4, 2), ("relu",), ("pool",), ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool",),
         ("conv", 192, 384, 3, 1, 1), ("relu",), ("conv", 384, 256, 3, 1, 1), ("relu",), ("conv", 256, 256, 3, 1, 1), ("relu",)]
_VGG16 = []
for _block, (_cin, _cout, _n) in enumerate([(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)]):
    if _block:
        _VGG16.append(("pool",))
    for _j in range(_n):
        _VGG16 += [("conv", _cin if _j == 0 else _cout, _cout, 3, 1, 1), ("relu",)]
NETS = {
    "alex": {"layers": _ALEX, "taps": (1, 4, 7, 9, 11), "channels": (64, 192, 384, 256, 256),
             "trunk_file": "alexnet-owt-7be5be79.pth", "min_size": 64},
    "vgg": {"layers": _VGG16, "taps": (3, 8, 15, 22, 29), "channels": (64, 128, 256, 512, 512),
            "trunk_file": "vgg16-397923af.pth", "min_size": 16},
}
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class Trunk(nn.Module):
    """torchvision's ``features`` Sequential (same indices, same keys), returning the tapped ReLUs."""

    def __init__(self, net: str):
        super().__init__()
        spec = NETS[net]
        mods = []
        for kind, *args in spec["layers"]:
            if kind == "conv":
                cin, cout, k, s, p = args
                mods.append(nn.Conv2d(cin, cout, k, stride=s, padding=p))
            elif kind == "relu":
                mods.append(nn.ReLU())
            else:
                mods.append(nn.MaxPool2d(kernel_size=3 if net == "alex" else 2, stride=2))
        self.features = nn.Sequential(*mods)
        self.taps = spec["taps"]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
            if i == self.taps[-1]:
                break
        return outs


class LPIPS(nn.Module):
    """(x [B, C, H, W], y [B, C, H, W], both in [0, 1]) -> [B] LPIPS distances (fp32)."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        self.net = one_of(net, "net", sorted(NETS))
        self.trunk = Trunk(net)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in NETS[net]["channels"])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        x = ((x * 2 - 1) - self.shift) / self.scale
        feats = self.trunk(x.to(self.shift.dtype))
        return [f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10) for f in feats]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for name, t in (("x", x), ("y", y)):
            check_images(t, name=name)
        if x.shape != y.shape:
            raise UserError(f"`x` {tuple(x.shape)} and `y` {tuple(y.shape)} must have the same shape.")
        small = NETS[self.net]["min_size"]
        if min(x.shape[-2:]) < small:
            raise UserError(
                f"LPIPS-{self.net} needs images of at least {small} px (got {tuple(x.shape[-2:])}); "
                "upsample them or use another diversity metric (e.g. 'feature_distance')."
            )
        total = 0.0
        for fx, fy, lin in zip(self._features(x), self._features(y), self.lins):
            total = total + lin((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return total.float()


def _default_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _default_lin_file(net: str) -> Path:
    local = _default_dir() / f"lpips_v0.1_{net}.pth"
    if local.is_file():
        return local
    spec = importlib.util.find_spec("lpips")
    if spec is not None and spec.origin is not None:
        packaged = Path(spec.origin).parent / "weights" / "v0.1" / f"{net}.pth"
        if packaged.is_file():
            return packaged
    return local


def _require(file: Path, what: str, how: str) -> Path:
    if not file.is_file():
        raise UserError(f"LPIPS {what} file {str(file)!r} not found (nothing is downloaded). {how}")
    return file


def load_lpips(
    net: str = "alex",
    trunk_path: str | os.PathLike | None = None,
    lin_path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
) -> LPIPS:
    """A frozen LPIPS metric from the two weight files (see the module docstring for defaults)."""
    one_of(net, "net", sorted(NETS))
    trunk_file = Path(trunk_path) if trunk_path is not None else _default_dir() / NETS[net]["trunk_file"]
    _require(
        trunk_file, "trunk",
        f"Put torchvision's ImageNet {net} weights ({NETS[net]['trunk_file']}, from download.pytorch.org/models/) "
        f"at {str(_default_dir() / NETS[net]['trunk_file'])!r} (set TORCH_HOME to move it) or pass `trunk_path`.",
    )
    lin_file = Path(lin_path) if lin_path is not None else _default_lin_file(net)
    _require(
        lin_file, "linear-layer",
        f"Copy `lpips/weights/v0.1/{net}.pth` from the lpips package (`pip download lpips --no-deps`, unzip) to "
        f"{str(_default_dir() / f'lpips_v0.1_{net}.pth')!r} or pass `lin_path`.",
    )
    model = LPIPS(net)
    trunk_sd = unwrap_state_dict(torch_load(trunk_file), trunk_file)
    trunk_sd = {k: v for k, v in trunk_sd.items() if not k.startswith("classifier.")}
    check_keys(model.trunk.state_dict().keys(), trunk_sd.keys(), source=repr(str(trunk_file)))
    model.trunk.load_state_dict(trunk_sd)
    lin_sd = unwrap_state_dict(torch_load(lin_file), lin_file)
    check_keys({f"lin{i}.model.1.weight" for i in range(len(model.lins))}, lin_sd.keys(), source=repr(str(lin_file)))
    model.lins.load_state_dict({f"{i}.weight": lin_sd[f"lin{i}.model.1.weight"] for i in range(len(model.lins))})
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model
