"""How many tensor operations one training step's loss dispatches, forward (with the regularisers) and backward.
Prints one JSON object.

    python bench/dispatch_count.py --preset mnist

On a GPU each of these operations launches at least one kernel, and at tens of microseconds of host time per
launch their number, not the arithmetic, sets the time of a step of the MNIST models (see the README's H100
section). The count does not depend on the device or the batch size, so it is measured on the CPU at batch 2.
Views (``view``, ``expand``, ``select``, ...) and ``detach`` launch nothing and are left out.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from functools import partial
from unittest.mock import patch

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nvae_hub import NVAE, NVAEConfig
from nvae_hub import model as nvae_model
from nvae_hub.layers import normalised_weights

NO_KERNEL = ("alias", "as_strided", "chunk", "detach", "expand", "permute", "select", "slice", "split", "squeeze",
             "t", "transpose", "unbind", "unsqueeze", "view", "_unsafe_view")


class CountOperations(TorchDispatchMode):
    """Counts the ATen operations dispatched inside the ``with`` block, by name, views left out."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.removeprefix("aten::")
        if name not in NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mnist", choices=NVAEConfig.presets())
    parser.add_argument("--top", type=int, default=10, help="list the most frequent operations (default: 10)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset(args.preset)).train()
    model.warm_up_spectral_vectors()  # as the training step does before its first update
    cfg = model.config
    x = torch.rand(2, cfg.channels, cfg.image_size, cfg.image_size)
    x = x.bernoulli() if cfg.output == "bernoulli" else x
    weights = {"kl_weight": torch.tensor(0.5), "reg_weight": torch.tensor(cfg.reg_weight), "check_inputs": False}
    result: dict[str, object] = {"benchmark": "dispatch_count", "preset": args.preset, "torch": torch.__version__}
    # The weight normalisation runs on stacks of same-shape weights on a GPU and one convolution at a time on a CPU
    # (nvae_hub.layers.normalised_weights); both are counted here, on the CPU.
    for name, stack in (("stacked_as_on_gpus", True), ("one_at_a_time_as_on_cpus", False)):
        model.zero_grad(set_to_none=True)  # else the second backward pass also counts the accumulation
        with patch.object(nvae_model, "normalised_weights", partial(normalised_weights, stack=stack)):
            with CountOperations() as forward:
                out = model.loss(x, **weights)
            with CountOperations() as backward:
                out.total.backward()
        result[name] = {
            "forward": sum(forward.counts.values()),
            "backward": sum(backward.counts.values()),
            "forward_top": dict(forward.counts.most_common(args.top)),
            "backward_top": dict(backward.counts.most_common(args.top)),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
