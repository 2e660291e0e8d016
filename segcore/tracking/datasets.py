"""A canonical dataset as an MLflow dataset input, so the UI's Dataset column shows what a run
trained or was scored on and runs on the same data group together.

name: the folder the data came from (``camvid``, ``demo``); digest: the first 32 hex digits of
the manifest's content hash (MLflow stores digests in 36 characters); source: where the data was
read from, ``s3`` or ``local``; schema: the classes and the ignore index; profile: items per
split and classes; context (input tag ``mlflow.data.context``): the split the run used.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath

from segcore.tracking.settings import redact

CONTEXT_TAG = "mlflow.data.context"
DIGEST_LENGTH = 32


def dataset_name(manifest: dict, source: str) -> str:
    """The last folder of the original data (the manifest's ``source``), else of ``source``."""
    for where in (manifest.get("source"), source):
        name = PurePosixPath(str(where or "").rstrip("/")).name
        if name:
            return name
    return "dataset"


def dataset_input(manifest: dict, source: str, context: str):
    """The ``mlflow.entities.DatasetInput`` of a canonical dataset read from ``source``."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    uri = redact(str(source))
    schema = {"labels": manifest["labels"], "ignore_index": manifest["ignore_index"], "format": manifest["format"]}
    profile = {"splits": manifest["splits"], "num_classes": len(manifest["labels"])}
    dataset = Dataset(
        name=dataset_name(manifest, uri),
        digest=manifest["content_hash"][:DIGEST_LENGTH],
        source_type="s3" if uri.startswith("s3://") else "local",
        source=json.dumps({"uri": uri}),
        schema=json.dumps(schema),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset=dataset, tags=[InputTag(key=CONTEXT_TAG, value=context)])
