"""Mixtures: a share (`weight`) or a count (`samples`) of each file's records, drawn with the run's seed.

Each file is drawn on its own, without replacement, by a numpy Generator seeded with (train.seed, the file's place
in its list, its path): the draw depends on nothing read before it, so the same config and data always give the
same records (and a resumed run the same draw; its digest is part of the fingerprint resume checks). Drawn records
keep their file order.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowtune.config import DataFile
from lowtune.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Drawn:
    """The records drawn from one file: their positions among its records."""

    file: str
    records: int  # in the file
    indices: np.ndarray  # (drawn,) int64, ascending
    weight: float | None = None
    samples: int | None = None

    @property
    def count(self) -> int:
        return len(self.indices)

    def describe(self) -> str:
        how = f" (weight {self.weight:g})" if self.weight is not None else ""
        how += f" (samples {self.samples:,})" if self.samples is not None else ""
        return f"{Path(self.file).name} {self.count:,} of {self.records:,} records{how}"

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "records": self.records,
            "drawn": self.count,
            "weight": self.weight,
            "samples": self.samples,
        }


def draw(entry: DataFile, file: str, records: int, seed: int, place: int) -> Drawn:
    """The records of `entry` that the run takes: all of them, `weight` of them, or `samples` of them.

    Args:
        entry: the data.files entry (its weight or samples).
        file: the file, as messages name it.
        records: how many records the file has.
        seed: train.seed.
        place: the entry's position in its list.
    """
    if entry.samples is not None and entry.samples > records:
        raise UserError.one(
            f"samples: {entry.samples:,} asks for more records than the file has ({records:,})",
            file,
            fix=f"give samples: {records:,} or fewer, or a weight (a share of the file): records are drawn without "
            "replacement (to see a small file more often, raise train.epochs)",
        )
    if entry.samples is not None:
        count = entry.samples
    elif entry.weight is not None:
        count = max(1, round(entry.weight * records))
    else:
        return Drawn(file, records, np.arange(records, dtype=np.int64))
    path_key = int.from_bytes(hashlib.sha256(entry.path.encode()).digest()[:8], "little")
    generator = np.random.default_rng([seed, place, path_key])
    indices = np.sort(generator.choice(records, size=count, replace=False)).astype(np.int64)
    return Drawn(file, records, indices, entry.weight, entry.samples)


@dataclass(frozen=True)
class Mixture:
    """What was drawn from each file of data.files."""

    drawn: tuple[Drawn, ...]

    @property
    def is_drawn(self) -> bool:
        """Whether any file gave a weight or samples (else the data set is every record of every file)."""
        return any(each.weight is not None or each.samples is not None for each in self.drawn)

    def describe(self) -> str:
        return "mixture: " + ", ".join(each.describe() for each in self.drawn)

    def digest(self) -> str | None:
        """sha256 of which records were drawn from each file, what resume compares; None when no file is drawn (the
        files' own digests then say it all)."""
        if not self.is_drawn:
            return None
        hashed = hashlib.sha256()
        for each in self.drawn:
            hashed.update(f"{each.records}:{each.count}:".encode() + each.indices.tobytes())
        return hashed.hexdigest()

    def to_dict(self) -> list[dict]:
        return [each.to_dict() for each in self.drawn]

    def log(self) -> None:
        if self.is_drawn:
            log.info("%s", self.describe())
