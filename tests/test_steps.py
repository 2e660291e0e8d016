"""One step, one function: a CLI command and a Kubeflow component of the same step call the same
library function, so they log the same MLflow parameter and metric keys (both runs come from the
session's ``tiny`` fixture in conftest.py)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("step", ["convert", "train", "export", "eval", "optimize"])
def test_cli_and_component_log_the_same_keys(tiny, step):
    cli_params, cli_metrics = tiny.keys["cli"][step]
    kfp_params, kfp_metrics = tiny.keys["pipeline"][step]
    assert cli_metrics and cli_params
    assert cli_metrics == kfp_metrics
    assert cli_params == kfp_params
