"""BuildConfig: validation before any work, and the CLI's arguments map onto it."""

from __future__ import annotations

import pytest

from cmrprep.plan import ConfigError
from pipelines.build import BuildConfig
from pipelines.build.__main__ import config_from_args, parse_args


def test_cli_arguments_map_onto_the_config(tmp_path):
    args = parse_args([str(tmp_path), "out", "--seed", "4", "--workers", "0", "--no-report", "--quiet"])
    cfg = config_from_args(args)
    assert cfg == BuildConfig(str(tmp_path), "out", seed=4, workers=0, report=False, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"workers": -1}, "--workers"), ({"retries": -2}, "--retries"),
    ({"weight_scheme": "focal"}, "weight_scheme"),
])
def test_bad_options_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BuildConfig(tmp_path, tmp_path / "out", **kwargs).validate()
    with pytest.raises(ConfigError, match="does not exist"):
        BuildConfig(tmp_path / "nowhere", tmp_path / "out").validate()
