"""jobs.benchmark's --rows: sizes for scale, one size for badinput, overrides after it kept as overrides."""

from __future__ import annotations

import pytest

from hscr_platform.bench.badinput import BadInputBenchConfig
from hscr_platform.bench.scale import ScaleBenchConfig
from hscr_platform.core.config import load_config
from jobs.benchmark import rows_override, split_rows


def test_rows_and_the_overrides_it_swallowed_are_split():
    assert split_rows(["10000", "50000", "workdir=/x", "100000"]) == ([10000, 50000, 100000], ["workdir=/x"])
    with pytest.raises(SystemExit):
        split_rows(["10k"])


def test_rows_become_the_configs_rows_key():
    scale = load_config(ScaleBenchConfig, None, rows_override("scale", [200, 400]))
    assert scale.rows == (200, 400)
    assert load_config(BadInputBenchConfig, None, rows_override("badinput", [300])).rows == 300
    with pytest.raises(SystemExit):
        rows_override("badinput", [1, 2])
    assert rows_override("scale", []) == []
