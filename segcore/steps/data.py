"""Where a step's data comes from: a raw dataset (any layout ``segcore convert`` reads, local or
s3://) or a canonical dataset, described once for every step that takes data."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class DataSource:
    """The reference CLI's data flags: roots of images (and of masks in the plain layout with
    separate folders), the format, and how val is split off when none is given."""

    train_root: str
    val_root: str | None = None
    train_ann: str | None = None
    val_ann: str | None = None
    fmt: str = "auto"
    val_ratio: float = 0.2
    split_seed: int = 42

    PATHS = ("train_root", "val_root", "train_ann", "val_ann")

    def localized(self) -> DataSource:
        """The same source with s3:// paths replaced by local copies (downloaded into the cache)."""
        from segcore.storage import local_input

        return replace(self, **{k: str(local_input(v)) for k in self.PATHS if (v := getattr(self, k))})

    def convert_kwargs(self) -> dict:
        """Keyword arguments of ``segcore.data.convert`` (besides the train root)."""
        return dict(
            val_root=self.val_root,
            train_ann=self.train_ann,
            val_ann=self.val_ann,
            fmt=self.fmt,
            val_ratio=self.val_ratio,
            seed=self.split_seed,
        )

    def params(self) -> dict:
        """What MLflow records about the data source, under the CLI flags' names (credentials
        redacted)."""
        from segcore.tracking import redact

        out = {PARAM_NAMES[k]: redact(v) for k in self.PATHS if (v := getattr(self, k))}
        out.update(format=self.fmt, val_ratio=self.val_ratio, split_seed=self.split_seed)
        return out

    def canonical(self, target: Path) -> Path:
        """A canonical dataset of a *localized* source: the given one, or the raw data converted
        into ``target`` (reused when a previous attempt finished it)."""
        from segcore.data.convert import MANIFEST, convert, load_manifest

        root = Path(self.train_root)
        if (root / MANIFEST).is_file():
            load_manifest(root)
            return root
        if (target / MANIFEST).is_file():
            return target
        convert(root, target, **self.convert_kwargs())
        return target


PARAM_NAMES = {
    "train_root": "train_data_root",
    "val_root": "val_data_root",
    "train_ann": "train_ann_files",
    "val_ann": "val_ann_files",
}
