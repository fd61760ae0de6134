"""Make the README's signal propagation plot (Brock, De & Smith, ICLR 2021) with normlab's code.

    python scripts/make_spp_figure.py                 # -> docs/figures/spp.png and spp.svg

Five CIFAR-style ResNets of the same depth (default 110: three stages of 18 blocks, width 16) at
initialization, one unit-Gaussian batch (32 x 3 x 32 x 32, seed 0), normalization layers in
training mode (batch statistics):

* BN-ReLU-Conv: pre-activation ResNet with BatchNorm (``preact_resnet110``);
* ReLU-BN-Conv: the same with the other order (``order="act_norm"``);
* NF + Scaled WS: ``nf_resnet110`` with the residual branches active (``skipinit=False``);
* NF + He init: the same blocks with plain He-init convs (``std_conv=False``);
* no norm, He init: the pre-activation ResNet with ``norm="none"`` (it leaves the plot's top:
  its squared mean and variance reach ~1e12 at the last block).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from normlab import models, spp


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/figures/spp", help="output path without suffix")
    ap.add_argument("--depth", type=int, default=110, help="6n+2")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    d = args.depth
    builds = {
        "BN-ReLU-Conv": lambda: models.create(f"preact_resnet{d}", norm="bn"),
        "ReLU-BN-Conv": lambda: models.create(f"preact_resnet{d}", norm="bn", order="act_norm"),
        "NF + Scaled WS": lambda: models.create(f"nf_resnet{d}", skipinit=False),
        "NF + He init (no Scaled WS)": lambda: models.create(f"nf_resnet{d}", skipinit=False,
                                                             std_conv=False),
        "no norm, He init": lambda: models.create(f"preact_resnet{d}", norm="none"),
    }
    records = {}
    for label, build in builds.items():
        torch.manual_seed(args.seed)
        records[label] = spp.signal_propagation(
            build(), batch_size=args.batch_size, image_size=args.image_size, seed=args.seed)
        last = records[label][-1]
        print(f"{label:30s} last block: sq mean {last.avg_sq_mean:.3g}  var {last.avg_var:.3g}  "
              f"residual var {last.residual_var:.3g}")
    paths = spp.plot(records, Path(args.out), ylim=(1e-5, 1e4),
                     title=f"Signal propagation at init, CIFAR-style depth {d}, "
                           f"batch {args.batch_size}x3x{args.image_size}x{args.image_size}")
    for p in paths:
        print("wrote", p)


if __name__ == "__main__":
    main()
