"""GraphAvatar's warm-up (graphavatar.warmup): the anchor distances chosen by ``model.warmup.loss``."""

import math

import pytest
import torch

from graphavatar.warmup import ANCHOR_LOSSES, anchor_errors, mean_absolute, mean_squared
from headkit.fitting import FitResult


def test_anchor_loss_registry_picks_the_distance_and_names_unknown_ones():
    assert ANCHOR_LOSSES == {"mse": mean_squared, "l1": mean_absolute}
    anchors = {"means": torch.full((1, 2, 3), 0.3), "scales": torch.full((1, 2, 3), math.e),
               "quats": torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]]), "sh": torch.full((1, 2, 4, 3), -2.0),
               "opacities": torch.full((1, 2), 0.5)}
    pseudo = FitResult(means=torch.zeros(2, 3), quats=torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]),
                       scales=torch.ones(2, 3), opacities=torch.full((2,), 0.25), sh=torch.zeros(2, 1, 3),
                       sh_degree=0, head_space=True, scene_scale=1.0)
    mse = anchor_errors(anchors, pseudo, 0.1, "mse")
    l1 = anchor_errors(anchors, pseudo, 0.1, "l1")
    for errs, dist in ((mse, lambda x: x * x), (l1, abs)):  # differences: 3 edge lengths, 1, -2, 0.25
        assert [errs[k].item() for k in ("means", "scales", "sh", "opacities")] == pytest.approx(
            [dist(3.0), dist(1.0), dist(-2.0), dist(0.25)])
        assert errs["quats"].item() == pytest.approx(0.5)  # 1 - |<q, q'>| in both: 0 and 1
    with pytest.raises(ValueError, match=r"model\.warmup\.loss='l2'; expected one of \['l1', 'mse'\]"):
        anchor_errors(anchors, pseudo, 0.1, "l2")
