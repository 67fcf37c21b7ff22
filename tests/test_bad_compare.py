"""The bad-input battery for ``compare``: a method list that is empty, has an empty entry
or names a method twice, and training options compare cannot take, refused alike by the
command line (one line, exit status 2, nothing written) and by Python (ConfigError)."""

from __future__ import annotations

import pytest

from bad_input import assert_user_error, cli
from stabq import compare
from stabq.compare import PRESETS, planned_runs, resolve_methods
from stabq.errors import ConfigError

CASES = [
    (["--methods", ""], {"methods": ""}, ["--methods ''", "an empty method name"]),
    (["--methods", ","], {"methods": ","}, ["--methods ','", "an empty method name"]),
    (["--methods", "fsq,"], {"methods": "fsq,"}, ["an empty method name"]),
    (["--methods", "fsq,fsq"], {"methods": ["fsq", "fsq"]},
     ["fsq named more than once", "--seeds"]),
    (["--methods", "fsq, vq,fsq"], {"methods": "fsq, vq,fsq"}, ["fsq named more than once"]),
    (["--methods", "fsq,nope"], {"methods": "fsq,nope"}, ["unknown nope", "allowed: none,"]),
    (["--option", "seed=3"], {"options": {"seed": 3}}, ["--option seed", "for each run"]),
    (["--option", "two_stage=true"], {"options": {"two_stage": True}}, ["--option two_stage"]),
    (["--option", "nope=1"], {"options": {"nope": 1}}, ["unknown training option", "nope"]),
    (["--option", "lr"], None, ["--option 'lr': expected KEY=VALUE"]),
    (["--optimizer", "adam"], {"options": {"optimizer": "adam"}},
     ["optimizer='adam'", "adamw, sgd"]),
    (["--lr", "-1"], {"options": {"lr": -1.0}}, ["lr=-1"]),
    (["--batch-size", "0"], {"options": {"batch_size": 0}}, ["batch_size=0"]),
    (["--seeds", "0"], {"seeds": 0}, ["--seeds 0"]),
]  # fmt: skip


@pytest.mark.parametrize("args, python, fragments", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_compare_refuses_alike_on_the_cli_and_in_python(args, python, fragments, tmp_path):
    out = tmp_path / "report"
    result = cli("compare", "--data", "synthetic:8", "--epochs", "1", "--quiet", "--out", out,
                 *args)  # fmt: skip
    assert_user_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []  # refused before any run: nothing written
    if python is not None:
        with pytest.raises(ConfigError) as info:
            compare("synthetic:8", **{"epochs": 1, "progress": False, **python})
        assert "\n" not in str(info.value)
        assert all(f in str(info.value) for f in fragments), str(info.value)


def test_a_duplicate_is_not_counted_as_a_seed():
    with pytest.raises(ConfigError, match="fsq named more than once"):
        planned_runs("default", "fsq,fsq", 1)
    assert planned_runs("default", "fsq,vq", 1) == 2
    assert planned_runs("default", None, 2) == 2 * len(PRESETS["default"]["methods"]) == 2 * 19
    assert planned_runs("explode", "fsq", 3) == (1 + 4) * 3  # 2 baselines, guards off and on
    assert [m.name for m in resolve_methods(" fsq , vq ")] == ["fsq", "vq"]
