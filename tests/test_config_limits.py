"""Config sizes: every size field has an upper bound, and the parameter count, estimated from the config before
anything is built, has a limit; absurd configs are refused at once with a message that says why."""

from __future__ import annotations

import pytest

from nvae_hub import NVAE, NVAEConfig, config
from nvae_hub.config import LIMITS, MAX_GROUP_CELLS, MAX_PARAMETERS


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_channels": 1_000_000}, r"NVAEConfig\.num_channels=1000000 is invalid: it must be an integer >= 1 "
                                      r"and <= 4096"),
        ({"groups_per_scale": 10**7}, r"NVAEConfig\.groups_per_scale=10000000 is invalid"),
        ({"num_scales": 60, "image_size": 2**62}, r"NVAEConfig\.image_size=4611686018427387904 is invalid"),
        ({"num_scales": 60}, r"NVAEConfig\.num_scales=60 is invalid: it must be an integer >= 1 and <= 8"),
        ({"groups_per_scale": 256, "num_scales": 4, "adaptive_groups": False, "cells_per_group_enc": 2},
         rf"1024 latent groups of 2 encoder and 1 decoder cells: 3,072 cells, more than the limit of "
         rf"{MAX_GROUP_CELLS:,}"),
    ],
)
def test_absurd_sizes_are_refused_by_the_config(changes, message):
    with pytest.raises(ValueError, match=message):
        NVAEConfig.preset("tiny").replace(**changes)


@pytest.mark.parametrize("field", sorted(LIMITS))
def test_every_size_field_has_an_upper_bound(field):
    with pytest.raises(ValueError, match=rf"NVAEConfig\.{field}=.* <= {LIMITS[field]}"):
        NVAEConfig.preset("tiny").replace(**{field: LIMITS[field] + 1})


def test_a_config_past_the_parameter_limit_says_its_count(monkeypatch):
    count = sum(p.numel() for p in NVAE(NVAEConfig.preset("tiny")).parameters())
    monkeypatch.setattr(config, "MAX_PARAMETERS", count - 1)
    with pytest.raises(ValueError, match=rf"a model of about {count:,} parameters \(0\.0 GiB of float32 weights\), "
                                         rf"more than the limit of {count - 1:,}; reduce num_channels"):
        NVAEConfig.preset("tiny")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=rf"about 4,346,753,746 parameters \(16\.2 GiB.* limit of {MAX_PARAMETERS:,}"):
        NVAEConfig.preset("tiny").replace(num_channels=2048)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"use_se": False},
        {"num_flows": 2},
        {"adaptive_groups": False, "groups_per_scale": 3},
        {"channels": 3, "output": "logistic_mixture", "num_mixtures": 4},
        {"num_preprocess_blocks": 2, "num_postprocess_blocks": 2, "num_preprocess_cells": 3,
         "num_postprocess_cells": 2, "image_size": 32},
        {"num_scales": 3, "groups_per_scale": 4, "min_groups_per_scale": 3, "image_size": 32, "padding": 0,
         "latent_channels": 3, "cells_per_group_enc": 2, "cells_per_group_dec": 3},
        {"image_size": 12, "padding": 2, "num_channels": 20},
    ],
)
def test_the_estimate_is_the_built_count_for_varied_configs(changes):
    config = NVAEConfig.preset("tiny").replace(**changes)
    count = sum(p.numel() for p in NVAE(config).parameters())
    assert config.estimated_num_parameters() == count

