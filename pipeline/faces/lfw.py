"""LFW on disk: layouts and protocol files (View 1 people/pairs, View 2 10-fold), read into an `FaceSet`:
the images (and pairs) an embedding store is made of. Other face sets (folder trees, `.bin` files) are read
into the same class by `pipeline.faces.facesets`; images and transforms are `pipeline.faces.images`.

A data root holds either torchvision's layout (`root/lfw-py/<image dir>` + protocol `.txt` files) or the
image folder and the `.txt` files directly. The `.tgz` archives are never needed.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

IMAGE_DIRS = {"original": "lfw", "funneled": "lfw_funneled", "deepfunneled": "lfw-deepfunneled"}
PROTOCOLS = ("people", "pairs", "10fold")
SPLITS = ("train", "test")
# Official MD5 sums of the protocol files (the ones torchvision's LFW datasets check).
CHECKSUMS = {
    "pairs.txt": "9f1ba174e4e1c508ff7cdf10ac338a7d",
    "pairsDevTest.txt": "5132f7440eb68cf58910c8a45a2ac10b",
    "pairsDevTrain.txt": "4f27cbf15b2da4a85c1907eb4181ad21",
    "people.txt": "450f0863dd89e85e73936a6d71a3474b",
    "peopleDevTest.txt": "e4bf5be0a43b5dcd9dc5ccfcb8fb19c5",
    "peopleDevTrain.txt": "54eaac34beb6d042ed3a7d883e247a21",
    "lfw-names.txt": "a6d0a479bd074669f656265a6e693f6d",
}
GET_LFW_HELP = (
    "Get LFW from https://vis-www.cs.umass.edu/lfw/ (or a mirror), extract the image archive and put the "
    "protocol .txt files beside it: DIR/lfw-py/lfw-deepfunneled/<Name>/<Name>_0001.jpg and "
    "DIR/lfw-py/pairsDevTest.txt etc. (DIR/lfw-deepfunneled/... also works). Then pass --data-root DIR "
    "or set LFW_ROOT=DIR."
)


def protocol_file(protocol: str, split: str) -> str:
    """The official file that defines a (protocol, split); View 2 `10fold` uses all of `pairs.txt`."""
    if protocol == "10fold":
        return "pairs.txt"
    if protocol not in PROTOCOLS or split not in SPLITS:
        raise PipelineError(f"unknown protocol/split {protocol}/{split}: use {PROTOCOLS} and {SPLITS}")
    return f"{protocol}Dev{split.capitalize()}.txt"


def find_base(data_root: Path, image_set: str) -> Path:
    """The folder under `data_root` that holds the image folder of `image_set` and the protocol files."""
    if image_set not in IMAGE_DIRS:
        raise PipelineError(f"unknown image set {image_set!r}: use one of {sorted(IMAGE_DIRS)}")
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise PipelineError(f"data root {data_root} does not exist. {GET_LFW_HELP}")
    image_dir = IMAGE_DIRS[image_set]
    for base in (data_root / "lfw-py", data_root):
        if (base / image_dir).is_dir():
            return base
    archives = sorted(p.name for p in [*data_root.glob("*.tgz"), *data_root.glob("lfw-py/*.tgz")])
    hint = f" Found archives {archives}: extract them in place." if archives else ""
    raise PipelineError(
        f"no '{image_dir}/' image folder (image set {image_set}) under {data_root} or {data_root / 'lfw-py'}."
        f"{hint} {GET_LFW_HELP}"
    )


def check_checksum(path: Path) -> bool:
    """Warn (naming the file) when a protocol file differs from the official one; True when it matches."""
    expected = CHECKSUMS.get(path.name)
    if expected is None:
        return True
    actual = hashlib.md5(path.read_bytes()).hexdigest()
    if actual != expected:
        warnings.warn(f"{path} differs from the official LFW file (md5 {actual}, expected {expected})", stacklevel=2)
        return False
    return True


def image_name(name: str, number: int) -> str:
    return f"{name}/{name}_{number:04d}.jpg"


def _read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of the non-blank lines."""
    if not path.is_file():
        raise PipelineError(f"protocol file {path} is missing. {GET_LFW_HELP}")
    check_checksum(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"cannot read protocol file {path}: {e}") from e
    lines = [(k, line.split()) for k, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise PipelineError(f"protocol file {path} is empty. {GET_LFW_HELP}")
    return lines


def check_name(name: str, path: Path, line: int) -> str:
    """A person's name from a protocol file, which becomes a folder name under the data root: no path
    separators, no `.` or `..`, so that every image path stays inside the data root."""
    if name in (".", "..") or any(c in name for c in "/\\\0") or Path(name).is_absolute():
        raise PipelineError(
            f"{path}, line {line}: name {name!r} is not a person's name (it would lead outside the data root)"
        )
    return name


def parse_people(path: Path) -> list[tuple[str, int]]:
    """View 1 people file: a count, then `name n_images` lines."""
    rows = _read_lines(path)
    people = []
    for line, r in rows[1:]:
        try:
            people.append((check_name(r[0], path, line), int(r[1])))
        except (IndexError, ValueError):
            raise PipelineError(f"{path}, line {line}: expected `name number_of_images`, got {r}") from None
    try:
        announced = int(rows[0][1][0])
    except ValueError:
        raise PipelineError(f"{path}, line {rows[0][0]}: expected the number of people, got {rows[0][1]}") from None
    if len(people) != announced:
        raise PipelineError(f"{path} announces {announced} people but lists {len(people)}")
    return people


def parse_pairs(path: Path) -> list[tuple[str, str, int, int]]:
    """Pairs file: a header, then `name i j` (same) or `name1 i name2 j` (different) lines, in order.
    Returns (image_a, image_b, same, fold); View 1 files have fold 0, `pairs.txt` folds 0..9."""
    rows = _read_lines(path)
    try:
        header = [int(x) for x in rows[0][1]]
        per_fold = 2 * header[-1]
    except (ValueError, IndexError):
        raise PipelineError(f"{path}, line {rows[0][0]}: expected a header of counts, got {rows[0][1]}") from None
    out = []
    for k, (line, r) in enumerate(rows[1:]):
        fold = k // per_fold if len(header) == 2 else 0
        try:
            if len(r) == 3:
                name = check_name(r[0], path, line)
                out.append((image_name(name, int(r[1])), image_name(name, int(r[2])), 1, fold))
            elif len(r) == 4:
                a, b = check_name(r[0], path, line), check_name(r[2], path, line)
                out.append((image_name(a, int(r[1])), image_name(b, int(r[3])), 0, fold))
            else:
                raise PipelineError(f"{path}, line {line}: expected 3 or 4 fields, got {r}")
        except ValueError:
            raise PipelineError(f"{path}, line {line}: image numbers must be integers, got {r}") from None
    expected = header[0] * per_fold if len(header) == 2 else per_fold
    if len(out) != expected:
        raise PipelineError(f"{path} announces {expected} pairs but lists {len(out)}")
    return out


@dataclass(frozen=True)
class FaceSet:
    """The images (and pairs) of one protocol split, as arrays ready for an embedding store."""

    data_root: Path
    """The `--data-root` folder; `paths` are relative to it."""
    image_set: str
    protocol: str
    split: str
    paths: list[str]
    """Image paths relative to `data_root`, de-duplicated, in protocol order."""
    labels: np.ndarray
    """int64 identity index of each image into `identities`."""
    identities: list[str]
    pairs: np.ndarray | None = None
    """int64 [P, 2] row indices into `paths` (pair protocols only)."""
    pair_labels: np.ndarray | None = None
    """int8 [P]: 1 = same person."""
    pair_folds: np.ndarray | None = None
    """int8 [P]: View 2 fold (0 for View 1)."""
    skipped: list[str] = field(default_factory=list)
    """Listed images that were missing and skipped (with `skip_missing`)."""
    encoded: list[bytes] | None = None
    """Encoded images held in memory (a `.bin` set), one per path; None: the files `data_root / path`."""

    def __len__(self) -> int:
        return len(self.paths)

    def absolute(self, i: int) -> Path:
        return self.data_root / self.paths[i]

    def source(self, i: int) -> Path | bytes:
        """What `images.load_image` decodes for image i: its file, or its encoded bytes."""
        return self.absolute(i) if self.encoded is None else self.encoded[i]

    def limit(self, n: int | None) -> FaceSet:
        """The first n images (people protocol) or the first n pairs and their images (pair protocols)."""
        if n is None:
            return self
        if self.pairs is None:
            keep = np.arange(min(n, len(self.paths)))
            return self.subset(keep)
        return self.select_pairs(np.arange(min(n, len(self.pairs))))

    def subset(self, rows: np.ndarray) -> FaceSet:
        """Keep image rows `rows` (people protocols; pairs are dropped and re-indexed when present)."""
        rows = np.asarray(rows, dtype=np.int64)
        encoded = None if self.encoded is None else [self.encoded[i] for i in rows]
        if self.pairs is None:
            return replace(self, paths=[self.paths[i] for i in rows], labels=self.labels[rows], encoded=encoded)
        new_index = np.full(len(self.paths), -1, dtype=np.int64)
        new_index[rows] = np.arange(len(rows))
        mapped = new_index[self.pairs]
        keep = (mapped >= 0).all(axis=1)
        return replace(
            self,
            paths=[self.paths[i] for i in rows],
            labels=self.labels[rows],
            encoded=encoded,
            pairs=mapped[keep],
            pair_labels=self.pair_labels[keep],
            pair_folds=self.pair_folds[keep],
        )

    def select_pairs(self, pair_rows: np.ndarray) -> FaceSet:
        """Keep the given pairs and only the images they use, in order of first use."""
        pairs = self.pairs[pair_rows]
        used, first = np.unique(pairs.ravel(), return_index=True)
        rows = used[np.argsort(first)]
        return replace(
            self, pairs=pairs, pair_labels=self.pair_labels[pair_rows], pair_folds=self.pair_folds[pair_rows]
        ).subset(rows)


def labels_for(names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Identity index of each name into the sorted distinct names, and those names."""
    identities = sorted(set(names))
    index = {n: i for i, n in enumerate(identities)}
    return np.array([index[n] for n in names], dtype=np.int64), identities


def load_protocol(
    data_root: Path | str, image_set: str, protocol: str, split: str, skip_missing: bool = False
) -> FaceSet:
    """Read a protocol split. A listed image that is missing is an error naming it (and counting the
    others), unless `skip_missing`, which drops it (and the pairs that use it) and records it."""
    data_root = Path(data_root)
    base = find_base(data_root, image_set)
    image_dir = base.relative_to(data_root) / IMAGE_DIRS[image_set]
    source = base / protocol_file(protocol, split)
    if protocol == "people":
        rel = [image_name(name, k) for name, n in parse_people(source) for k in range(1, n + 1)]
        pairs = pair_labels = pair_folds = None
    else:
        listed = parse_pairs(source)
        rel, index = [], {}
        for a, b, _, _ in listed:
            for p in (a, b):
                if p not in index:
                    index[p] = len(rel)
                    rel.append(p)
        pairs = np.array([[index[a], index[b]] for a, b, _, _ in listed], dtype=np.int64).reshape(-1, 2)
        pair_labels = np.array([s for _, _, s, _ in listed], dtype=np.int8)
        pair_folds = np.array([f for _, _, _, f in listed], dtype=np.int8)
    labels, identities = labels_for([p.split("/")[0] for p in rel])
    proto = FaceSet(
        data_root,
        image_set,
        protocol,
        split,
        [str(image_dir / p) for p in rel],
        labels,
        identities,
        pairs,
        pair_labels,
        pair_folds,
    )
    missing = [i for i, p in enumerate(proto.paths) if not (data_root / p).is_file()]
    if not missing:
        return proto
    first = data_root / proto.paths[missing[0]]
    if not skip_missing:
        raise PipelineError(
            f"image {first} listed in {source.name} is missing ({len(missing) - 1} other listed images are "
            f"missing too). Fix the data root, or pass --skip-missing to leave them out."
        )
    log.warning("skipping %d missing images (first: %s)", len(missing), first)
    keep = np.setdiff1d(np.arange(len(proto.paths)), missing)
    return replace(proto.subset(keep), skipped=[proto.paths[i] for i in missing])


def download_lfw(data_root: Path | str, image_set: str) -> None:
    """Try torchvision's download into `data_root/lfw-py`; on failure say where to get LFW by hand."""
    from torchvision.datasets import LFWPairs, LFWPeople

    try:
        LFWPeople(str(data_root), split="test", image_set=image_set, download=True)
        LFWPairs(str(data_root), split="test", image_set=image_set, download=True)
        LFWPairs(str(data_root), split="10fold", image_set=image_set, download=True)
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise PipelineError(f"downloading LFW failed ({type(e).__name__}: {e}). {GET_LFW_HELP}") from e
