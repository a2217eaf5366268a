import pytest

from clx_core.config import ConfigError
from clx_core.experiments.complex_synapses import SynapsesConfig


def test_profiles_and_overrides():
    paper = SynapsesConfig.for_profile("paper")
    assert paper.hidden == (400, 400) and paper.iters == 500 and paper.seeds == 10
    quick = SynapsesConfig.for_profile("quick", seeds=3, alpha=None)
    assert quick.seeds == 3 and quick.alpha == paper.alpha and quick.hidden != paper.hidden
    assert quick.to_dict()["hidden"] == list(quick.hidden)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(data="cifar100"), "'data' = 'cifar100'"),
        (dict(scenarios=("task", "joint")), "'scenarios' = 'joint'"),
        (dict(iters=0), "'iters' = 0"),
        (dict(seeds=-2), "'seeds' = -2"),
        (dict(lr=0.0), "'lr' = 0.0"),
        (dict(lr=float("nan")), "'lr' = nan"),
        (dict(n_beakers=-1), "'n_beakers' = -1"),
        (dict(alpha=3000.0), "'alpha' = 3000.0"),
        (dict(optimizers=("cs",)), "'optimizers'"),
        (dict(hidden=()), "'hidden'"),
        (dict(seeds=2.5), "'seeds' = 2.5"),
        (dict(typo=1), "'typo' = 1"),
    ],
)
def test_bad_values_name_parameter_value_and_range(kw, match):
    with pytest.raises(ConfigError, match=match):
        SynapsesConfig.for_profile("smoke", **kw)


def test_unknown_profile():
    with pytest.raises(ConfigError, match="'profile' = 'fast'"):
        SynapsesConfig.for_profile("fast")
