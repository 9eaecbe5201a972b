"""Face sets beyond LFW's protocol files, read into the same `lfw.FaceSet` that the embed stage consumes.

- `folder`: a tree `DIR/<identity>/<image>` (any format PIL reads); every image, sorted by identity (then by
  file name, digits compared as numbers), labelled by its folder. An optional CSV `path_a,path_b,same[,fold]`
  (paths relative to DIR) lists pairs, stored as the LFW pair protocols store theirs.
- `bin`: insightface's verification format, a pickle of `(bins, issame_list)`: encoded images (JPEG/PNG bytes)
  and one flag per pair; pair i is images 2i and 2i+1, in 10 consecutive folds. It is read with the restricted
  unpickler of `pipeline.faces.untrusted` (a pickle can run code; this one cannot). Its images have no identities:
  each is its own label, so only its listed pairs (`score --pairs`) can be scored.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import posixpath
import re
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.faces import lfw
from pipeline.faces.untrusted import load_pickle

log = logging.getLogger(__name__)

DATASETS = ("lfw", "folder", "bin")
FOLDS = 10
_DIGITS = re.compile(r"(\d+)")


def load_faceset(
    dataset: str,
    data_root: Path | str,
    image_set: str = "deepfunneled",
    protocol: str = "people",
    split: str = "test",
    pairs_file: Path | str | None = None,
    skip_missing: bool = False,
) -> lfw.FaceSet:
    """The images (and pairs) of a face set: an LFW protocol split, a folder tree or a `.bin` file."""
    if dataset == "lfw":
        return lfw.load_protocol(data_root, image_set, protocol, split, skip_missing)
    if dataset == "folder":
        return load_folder(data_root, pairs_file, skip_missing)
    if dataset == "bin":
        return load_bin(data_root)
    raise PipelineError(f"unknown dataset {dataset!r}: use one of {DATASETS}")


def pairs_sha256(proto: lfw.FaceSet) -> str:
    """sha256 of the pair list (int64 little-endian [P, 2] row indices, then int8 same flags); '' without pairs."""
    if proto.pairs is None:
        return ""
    h = hashlib.sha256(np.ascontiguousarray(proto.pairs, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(proto.pair_labels, dtype="i1").tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ folder tree


def natural_key(name: str) -> tuple:
    """Sort key comparing runs of digits as numbers (img_2 before img_10), ties broken by the name itself."""
    return [int(t) if k % 2 else t for k, t in enumerate(_DIGITS.split(name))], name


def image_suffixes() -> set[str]:
    """File suffixes of the formats PIL can open."""
    from PIL import Image

    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _utf8(name: str, where: Path) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise PipelineError(f"{where / name!r}: the name is not valid UTF-8; rename it") from None
    return name


def scan_folder(root: Path) -> tuple[list[str], list[str]]:
    """(image paths `identity/file` relative to root, their identities), by identity then natural file order."""
    if not root.is_dir():
        raise PipelineError(f"--data-root {root} is not a folder: --dataset folder needs DIR/<identity>/<image>")
    suffixes = image_suffixes()
    paths, names, loose = [], [], 0
    for person in sorted(root.iterdir(), key=lambda p: p.name):
        if person.name.startswith("."):
            continue
        if not person.is_dir():
            loose += person.suffix.lower() in suffixes
            continue
        files = [f for f in person.iterdir() if not f.name.startswith(".") and f.suffix.lower() in suffixes]
        for f in sorted((f for f in files if f.is_file()), key=lambda f: natural_key(f.name)):
            paths.append(f"{_utf8(person.name, root)}/{_utf8(f.name, person)}")
            names.append(person.name)
    if loose:
        log.warning("%d images directly in %s are in no identity folder: left out", loose, root)
    if not paths:
        raise PipelineError(f"no images under {root}: --dataset folder expects DIR/<identity>/<image> files")
    return paths, names


def load_folder(root: Path | str, pairs_file: Path | str | None = None, skip_missing: bool = False) -> lfw.FaceSet:
    """Every image of `root/<identity>/`, labelled by identity (labels index the sorted identities); with
    `pairs_file`, its pairs as row indices (protocol `pairs-file`), else protocol `folder`."""
    root = Path(root)
    paths, names = scan_folder(root)
    labels, identities = lfw.labels_for(names)
    proto = lfw.FaceSet(root, "", "folder", "", paths, labels, identities)
    if pairs_file is None:
        return proto
    pairs, same, folds, skipped = read_pairs_csv(Path(pairs_file), root, {p: i for i, p in enumerate(paths)})
    if skipped and not skip_missing:
        raise PipelineError(
            f"{pairs_file} lists image {skipped[0]}, which is missing under {root} ({len(skipped) - 1} other missing "
            f"images too). Fix the list, or pass --skip-missing to leave out the pairs that use them."
        )
    if skipped:
        log.warning("leaving out the pairs of %d missing images (first: %s)", len(skipped), skipped[0])
    disagree = int((same.astype(bool) != (labels[pairs[:, 0]] == labels[pairs[:, 1]])).sum())
    if disagree:
        log.warning("%d pairs of %s disagree with the identity folders (kept as listed)", disagree, pairs_file)
    return lfw.FaceSet(
        root, "", "pairs-file", "", paths, labels, identities, pairs, same, folds, skipped=sorted(set(skipped))
    )


def _relative(cell: str, path: Path, line: int) -> str:
    rel = posixpath.normpath(cell.strip().replace("\\", "/"))
    if rel.startswith(("/", "../")) or rel in ("..", "."):
        raise PipelineError(f"{path}, line {line}: {cell!r} is not a path inside the data root")
    return rel


def _flag(cell: str, path: Path, line: int) -> int:
    value = {"0": 0, "1": 1, "false": 0, "true": 1}.get(cell.strip().lower())
    if value is None:
        raise PipelineError(f"{path}, line {line}: `same` must be 1 (same person) or 0, got {cell!r}")
    return value


def read_pairs_csv(
    path: Path, root: Path, index: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(pairs [P, 2] int64, same [P] int8, folds [P] int8, missing images) of a `path_a,path_b,same[,fold]` CSV;
    a first line that is not a pair is a header. Pairs whose images are missing are left out (and named)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(k, r) for k, r in enumerate(csv.reader(f), 1) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PipelineError(f"cannot read pairs file {path}: {e}") from e
    if rows and len(rows[0][1]) >= 3 and rows[0][1][2].strip().lower() not in ("0", "1", "true", "false"):
        rows = rows[1:]  # header
    pairs, same, folds, missing = [], [], [], []
    for line, r in rows:
        if len(r) not in (3, 4):
            raise PipelineError(f"{path}, line {line}: expected path_a,path_b,same[,fold], got {r}")
        a, b = _relative(r[0], path, line), _relative(r[1], path, line)
        for rel in (a, b):
            if rel not in index and (root / rel).is_file():
                raise PipelineError(f"{path}, line {line}: {rel} is not an image of an identity folder of {root}")
        gone = [rel for rel in (a, b) if rel not in index]
        if gone:
            missing += gone
            continue
        try:
            fold = int(r[3]) if len(r) == 4 else 0
        except ValueError:
            raise PipelineError(f"{path}, line {line}: fold must be an integer, got {r[3]!r}") from None
        if not 0 <= fold <= 127:
            raise PipelineError(f"{path}, line {line}: fold must be between 0 and 127, got {fold}")
        pairs.append((index[a], index[b]))
        same.append(_flag(r[2], path, line))
        folds.append(fold)
    if not pairs and not missing:
        raise PipelineError(f"pairs file {path} lists no pairs (expected path_a,path_b,same[,fold] lines)")
    return (
        np.array(pairs, dtype=np.int64).reshape(-1, 2),
        np.array(same, dtype=np.int8),
        np.array(folds, dtype=np.int8),
        missing,
    )


# ------------------------------------------------------------------------------------------------ .bin files


def bin_folds(n_pairs: int, k: int = FOLDS) -> np.ndarray:
    """Fold of each pair: k consecutive folds, the first n % k one pair larger (scikit-learn's KFold)."""
    sizes = np.full(k, n_pairs // k) + (np.arange(k) < n_pairs % k)
    return np.repeat(np.arange(k, dtype=np.int8), sizes)


def _encoded(item: object, i: int, path: Path) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise PipelineError(f"{path}: image {i} is a {type(item).__name__}, not encoded image bytes")


def _issame(flags: object, path: Path) -> np.ndarray:
    if isinstance(flags, np.ndarray) and flags.dtype.kind in "bui" and flags.ndim == 1:
        flags = flags.tolist()
    if not isinstance(flags, (list, tuple)) or not all(
        isinstance(v, (bool, np.bool_)) or (isinstance(v, int) and v in (0, 1)) for v in flags
    ):
        raise PipelineError(f"{path}: the second item must be a list of issame booleans (one per pair)")
    return np.array([int(v) for v in flags], dtype=np.int8)


def load_bin(path: Path | str) -> lfw.FaceSet:
    """An insightface verification `.bin`: images 2i and 2i+1 form pair i, `issame[i]` says whether they show
    the same person. Each image is its own identity (label = image index)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"--data-root {path} is not a file: --dataset bin needs a .bin file")
    obj = load_pickle(path)
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise PipelineError(f"{path} is not a verification .bin: expected a pickled (bins, issame_list) pair")
    bins, flags = obj
    if isinstance(bins, np.ndarray) and bins.dtype == object:
        bins = bins.tolist()
    if not isinstance(bins, (list, tuple)):
        raise PipelineError(f"{path}: the first item must be a list of encoded images, got {type(bins).__name__}")
    same = _issame(flags, path)
    if len(bins) != 2 * len(same) or not len(same):
        raise PipelineError(f"{path} holds {len(bins)} images for {len(same)} pairs: expected 2 images per pair")
    encoded = [_encoded(b, i, path) for i, b in enumerate(bins)]
    names = [f"{path.name}#{i}" for i in range(len(encoded))]
    return lfw.FaceSet(
        path.parent,
        "",
        "bin",
        "",
        names,
        np.arange(len(names), dtype=np.int64),
        names,
        np.arange(len(names), dtype=np.int64).reshape(-1, 2),
        same,
        bin_folds(len(same)),
        encoded=encoded,
    )
