"""Copy the images of one protocol split (and every protocol file) into a small data root of the same layout.

The GPU device machine sees only the project's working tree (at most 64 MiB), not ../shared: the 3,708
LFWPeople test images (31 MiB) travel as such a slice, in a folder git ignores, named in the run's `carry`.

    python -m benchmarks.lfw_slice --data-root ../shared/data --out .device/lfw
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from benchmarks import argparse_command
from pipeline.errors import PipelineError
from pipeline.faces import lfw


def make_slice(data_root: Path, out: Path, image_set: str = "deepfunneled", protocol: str = "people",
               split: str = "test") -> int:  # fmt: skip
    """Copy the split's images and all protocol .txt files under `out` (torchvision layout); returns the
    number of images. Files already there with the same size are kept, so a second run is quick."""
    proto = lfw.load_protocol(data_root, image_set, protocol, split)
    base = lfw.find_base(data_root, image_set)
    dest = out / "lfw-py"
    dest.mkdir(parents=True, exist_ok=True)
    for txt in base.glob("*.txt"):
        shutil.copy2(txt, dest / txt.name)
    inside = dest.resolve()
    for rel in proto.paths:
        src = data_root / rel
        target = dest / src.relative_to(base)
        if not target.resolve().is_relative_to(inside):  # load_protocol already refuses such names
            raise PipelineError(f"{rel} would be copied outside {out}: refusing")
        if not (target.is_file() and target.stat().st_size == src.stat().st_size):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return len(proto)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True, help="The full LFW data root.")
    parser.add_argument("--out", type=Path, required=True, help="The slice's data root (created).")
    parser.add_argument("--image-set", default="deepfunneled", choices=sorted(lfw.IMAGE_DIRS))
    parser.add_argument("--protocol", default="people", choices=lfw.PROTOCOLS)
    parser.add_argument("--split", default="test", choices=lfw.SPLITS)
    args = parser.parse_args(argv)
    n = make_slice(args.data_root, args.out, args.image_set, args.protocol, args.split)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{n} images, {size / 2**20:.1f} MiB under {args.out}")


command = argparse_command("lfw-slice", main, __doc__)

if __name__ == "__main__":
    main()
