"""A large synthetic CT volume for measuring the pretraining slice cache (build memory and rate,
disk size, cold reads): DEPTH x 512 x 512 int16 at 0.7 x 0.7 x 1.0 mm, a ~40 HU body ellipse with
20 HU noise and a bone disc, air at -1000 HU with 5 HU noise, the first and last 50 slices all air
(skipped by the body test). Noise is what decides how well slices compress: real scans differ.

    python scripts/make_ct_bench_volume.py OUT.nii.gz [DEPTH]        # DEPTH defaults to 1000
"""

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def main() -> None:
    out = Path(sys.argv[1])
    depth = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:512, :512]
    body = ((y - 256) / 200) ** 2 + ((x - 256) / 230) ** 2 <= 1
    bone = body & ((y - 300) ** 2 + (x - 256) ** 2 <= 400)
    volume = np.empty((depth, 512, 512), np.int16)
    for k in range(depth):
        inside = body if 50 <= k < depth - 50 else np.zeros_like(body)
        plane = np.where(inside, 40 + rng.normal(0, 20, body.shape), -1000 + rng.normal(0, 5, body.shape))
        plane[inside & bone] += 700
        volume[k] = np.round(plane)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.7, 0.7, 1.0))
    out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(out), useCompression=out.name.endswith(".gz"))
    print(f"{out}: {volume.nbytes / 1e6:.0f} MB as int16, {out.stat().st_size / 1e6:.0f} MB on disk")


if __name__ == "__main__":
    main()
