"""nnU-Net's network for a checked plan, and its weights as numpy arrays.

The network is built as ``nnUNetTrainer.build_network_architecture`` builds it
(``get_network_from_plans`` with the plan's architecture, input channels from dataset.json,
one output per label, He initialisation), without importing the trainer and its plotting
stack. Deep supervision changes what ``forward`` returns, not the parameters, so training
(on) and inference (off) share one state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from laulima.core.weights import Weights
from laulima.errors import WeightsError
from laulima.nnunet.params import NnUNetParams

if TYPE_CHECKING:
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

__all__ = ["TRAINER_NAME", "build_network", "initial_network", "load_weights", "managers", "network_weights"]

TRAINER_NAME = "nnUNetTrainer"
"""The trainer class whose network, loss, augmentation and checkpoints this package uses unchanged."""


def managers(params: NnUNetParams) -> tuple[PlansManager, ConfigurationManager]:
    """nnU-Net's views of the checked plan (on a copy: nnU-Net may write into the dicts it is given)."""
    import copy

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(copy.deepcopy(params.plans))
    return plans_manager, plans_manager.get_configuration(params.configuration)


def build_network(params: NnUNetParams, *, deep_supervision: bool) -> torch.nn.Module:
    """The plan's network; its initial values come from torch's global RNG (see :func:`initial_network`)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans_manager, configuration = managers(params)
    n_outputs = plans_manager.get_label_manager(params.dataset_json).num_segmentation_heads
    network: torch.nn.Module = get_network_from_plans(
        configuration.network_arch_class_name,
        configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import,
        params.n_channels,
        n_outputs,
        allow_init=True,
        deep_supervision=deep_supervision,
    )
    return network


def initial_network(params: NnUNetParams, seed: int, *, deep_supervision: bool = True) -> torch.nn.Module:
    """The network initialised from ``seed`` alone; torch's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_network(params, deep_supervision=deep_supervision)


def network_weights(network: torch.nn.Module) -> Weights:
    """The state dict as numpy arrays, copied (training on does not change them)."""
    return {name: t.detach().cpu().numpy().copy() for name, t in network.state_dict().items()}


def load_weights(network: torch.nn.Module, weights: Mapping[str, Any]) -> None:
    """Copy ``weights`` (numpy arrays or tensors) into ``network`` in place: its parameters stay the
    objects an optimizer already holds. Keys and shapes must match exactly."""
    state = network.state_dict()
    missing = sorted(set(state) - set(weights))
    unexpected = sorted(set(weights) - set(state))
    if missing or unexpected:
        raise WeightsError(
            f"the weights do not fit this nnU-Net network: missing {missing[:3]}, unexpected {unexpected[:3]} "
            f"({len(missing)} / {len(unexpected)} in all); were they made under another plan or dataset.json?"
        )
    fresh = {}
    for name, target in state.items():
        value = weights[name]
        array = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        if tuple(array.shape) != tuple(target.shape):
            raise WeightsError(
                f"tensor {name!r} has shape {list(array.shape)}, this nnU-Net network expects {list(target.shape)}; "
                "were the weights made under another plan or dataset.json?"
            )
        if array.is_floating_point() and not bool(torch.isfinite(array).all()):
            raise WeightsError(f"tensor {name!r} holds NaN or infinite values; the model diverged or is damaged")
        fresh[name] = array.to(dtype=target.dtype)
    network.load_state_dict(fresh, strict=True)
