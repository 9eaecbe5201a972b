"""Whether an LFW face set embedded with a fine-tuned checkpoint holds people the network trained on: `embed`
warns when it does. View 2 (`pairs.txt`, the 10-fold protocol) shares most of its people with View 1's
peopleDevTrain, which every recipe trains on, so its accuracy with such a network is not a test result; the
test splits (pairsDevTest, peopleDevTest) share none (tests/test_finetune_split.py).

The checkpoint's `config` says what it was trained on (data root, image set, recipe, seeds); its people are
those of the recipe's split (`pipeline.finetune.split`), counted from the training files of the recorded data
root, or of the data root being embedded where the recorded one is not here (the message says which). A weights
file that does not record them gets a warning that says it cannot tell, with the count of the set's people in
peopleDevTrain."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path

from pipeline.embedding.embed import EmbedConfig
from pipeline.embedding.validation_set import VALIDATION
from pipeline.errors import PipelineError
from pipeline.faces import lfw
from pipeline.finetune.checkpoint import LATER_FIELDS
from pipeline.finetune.config import RUNTIME_FIELDS, FinetuneConfig
from pipeline.finetune.split import SPLIT_FIELDS, TrainingSplit, training_split
from pipeline.nets.models import read_weights_file

log = logging.getLogger(__name__)

PHRASE = "overlaps the training people"
"""The words every overlap warning holds (to search logs for)."""


@dataclass(frozen=True)
class Listed:
    """The people a protocol file lists (names only: no image is opened)."""

    name: str
    """The file, in words: "View 2 (pairs.txt)", "peopleDevTrain.txt"."""
    people: frozenset[str]
    pairs: tuple[tuple[str, str], ...] = ()
    """The people of each listed pair (pair protocols)."""


def listed(data_root: Path | str, image_set: str, protocol: str, split: str) -> Listed:
    """The people of the file of (protocol, split) under `data_root` (PipelineError when it cannot be read)."""
    file = lfw.protocol_file(protocol, split)
    path = lfw.find_base(Path(data_root), image_set) / file
    name = f"View 2 ({file})" if protocol == "10fold" else file
    if protocol == "people":
        return Listed(name, frozenset(n for n, _ in lfw.parse_people(path)))
    pairs = tuple((a.split("/")[0], b.split("/")[0]) for a, b, _, _ in lfw.parse_pairs(path))
    return Listed(name, frozenset(n for p in pairs for n in p), pairs)


def recorded_split(config: dict, data_root: Path, image_set: str) -> tuple[TrainingSplit, str]:
    """The split of a checkpoint's `config` and where its training files were read: the recorded data root, or
    `data_root` (with the recorded image set, else `image_set`) where the recorded one cannot be read."""
    known = {f.name for f in fields(FinetuneConfig)} - set(RUNTIME_FIELDS)
    config = {**LATER_FIELDS, **config}  # fields added since: the values that train as before
    cfg = FinetuneConfig(out=Path("unused.pt"), **{k: v for k, v in config.items() if k in known})
    tries = [(cfg, f"the training files of {cfg.data_root}")]
    note = f"the training files of {data_root} (the checkpoint's data root {cfg.data_root} cannot be read here)"
    tries += [(replace(cfg, data_root=data_root), note), (replace(cfg, data_root=data_root, image_set=image_set), note)]
    for attempt, where in tries:
        try:
            return training_split(attempt), where
        except PipelineError as e:
            problem = e
    raise problem


def overlap_warning(weights: str, faces: Listed, data_root: Path, image_set: str) -> str | None:
    """The warning for `faces` embedded with the weights file `weights`: None when none of its people trained
    (or validated) the network, or when `weights` is not a file."""
    if weights in ("imagenet", "none") or not Path(weights).is_file():
        return None
    _, meta = read_weights_file(weights)
    config = meta.get("config") or {}
    missing = [k for k in SPLIT_FIELDS if k not in config and k not in LATER_FIELDS]
    if missing:
        reason = "no finetune config" if config == {} else f"its config lacks {', '.join(missing)}"
        return _unknown(weights, faces, "a plain state_dict" if not meta else reason, data_root, image_set)
    try:
        split, where = recorded_split(config, data_root, image_set)
    except ValueError as e:  # a config this version cannot build
        return _unknown(weights, faces, f"its config does not fit this version: {e}", data_root, image_set)
    except PipelineError as e:
        reason = f"its training files cannot be read: {str(e).split('. ')[0]}"
        return _unknown(weights, faces, reason, data_root, image_set)
    trained = faces.people & split.people("train")
    validated = (faces.people & split.people("validation")) - trained
    if not trained and not validated:
        return None
    seen = trained | validated
    text = (
        f"{faces.name} {PHRASE} of {weights}: {len(trained):,} of its {len(faces.people):,} people trained the network"
    )
    text += f" and {len(validated):,} more were its validation people" if validated else ""
    if faces.pairs:
        n = sum(a in seen or b in seen for a, b in faces.pairs)
        text += f"; {n:,} of its {len(faces.pairs):,} pairs hold one of them"
    return (
        f"{text} ({config['recipe']} recipe, {split.source}; {where}). These people's scores measure how well the "
        f"network knows the people it trained on, not a test: for one, embed --protocol pairs or people --split test "
        f"(pairsDevTest and peopleDevTest share no person with peopleDevTrain)"
    )


def _unknown(weights: str, faces: Listed, reason: str, data_root: Path, image_set: str) -> str | None:
    """The warning for weights that do not say what they were trained on: the set's people in peopleDevTrain (None
    when there are none, or when peopleDevTrain cannot be read)."""
    try:
        dev_train = listed(data_root, image_set, "people", "train")
    except PipelineError:
        return None
    n = len(faces.people & dev_train.people)
    if not n:
        return None
    return (
        f"{weights} does not record what it was trained on ({reason}), so embed cannot tell whether {faces.name} "
        f"{PHRASE}: if it was fine-tuned on LFW's peopleDevTrain (as finetune does), {n:,} of its "
        f"{len(faces.people):,} people were among them"
    )


def warn_training_overlap(cfg: EmbedConfig) -> str | None:
    """Log (and return) `overlap_warning` for the LFW face set `cfg` embeds; a set that cannot be read is left to
    `embed` to report."""
    if cfg.dataset != "lfw" or cfg.weights in ("imagenet", "none") or cfg.split == VALIDATION:
        return None  # a checkpoint's validation people are held out of its training
    try:
        faces = listed(cfg.data_root, cfg.image_set, cfg.protocol, cfg.split)
    except PipelineError:
        return None
    message = overlap_warning(cfg.weights, faces, Path(cfg.data_root), cfg.image_set)
    if message is not None:
        log.warning(message)
    return message
