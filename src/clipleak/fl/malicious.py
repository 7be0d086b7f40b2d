"""The malicious server: it sends crafted CLIP-Adapter weights instead of the global model's and reads the
batch's features off each reply (:mod:`clipleak.recover.malicious`), then decodes them to images.

:class:`MaliciousStrategy` is the Flower side: an :class:`~clipleak.fl.strategy.AttackingStrategy` that sends
the crafted weights in place of the global state every round and attacks each reply with the imprint read-out.

The architecture the task defines is unchanged (same adapter, same width, same ratio); only the values of
``adapter.fc1.weight`` and ``adapter.fc2.weight`` that the server sends differ. Crafting uses the public split
alone. :class:`MaliciousServer` is what a Flower strategy or a benchmark calls: :meth:`MaliciousServer.craft`
once per round, :meth:`MaliciousServer.attack` per reply.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..data import ImageSet
from ..errors import ClipleakError
from ..peft import Victim
from ..priors import FeatureDecoder, decoder_images
from ..records import Observation, Reconstruction, gradient_view
from ..recover import public_features
from ..recover.adapter import AdapterGradientModel
from ..recover.malicious import ImprintPlan, craft_imprint, imprint_features
from .settings import Recipe
from .strategy import AttackingStrategy

ATTACK_NAME = "malicious-imprint"
WIRE_BALANCE = 16.0
"""The factor moved from ``W1`` to ``W2`` in the weights the server sends (see :meth:`MaliciousServer.craft`)."""


@dataclass
class MaliciousServer:
    """A round's crafted adapter weights (``state``, what the server sends), the plan that reads them back and
    the feature-to-image decoder of the target (None: the reconstruction holds the features only, as blank
    images)."""

    state: dict[str, torch.Tensor]
    plan: ImprintPlan
    groups: int
    decoder: FeatureDecoder | None = None

    @classmethod
    def craft(cls, victim: Victim, public: ImageSet, *, groups: int = 1, seed: int = 0,
              decoder: FeatureDecoder | None = None) -> MaliciousServer:
        """Weights for ``victim``'s adapter (its width as the task defines it) from the public images."""
        if victim.adapter is None:
            raise ClipleakError("the malicious server crafts CLIP-Adapter weights: the task's PEFT must be 'adapter'")
        feats = public_features(victim.clip_info, public)
        hidden = int(victim.adapter.fc1.weight.shape[0])
        state, plan = craft_imprint(feats.to(victim.adapter.fc1.weight.device), hidden, groups=groups, seed=seed)
        # Rebalanced for the wire: W1 / s and W2 * s compute the same adapter (ReLU is positively homogeneous)
        # but make W1's gradient s times larger and its float32 rounding s times smaller. A client sends its new
        # float32 state, so the server reads ``(sent - new) / lr``: with s = 1 the rounding of W1 drowns the
        # single-image bin differences the read-out subtracts; s = 16 (a power of two: exact) keeps them.
        state = {"adapter.fc1.weight": state["adapter.fc1.weight"] / WIRE_BALANCE,
                 "adapter.fc2.weight": state["adapter.fc2.weight"] * WIRE_BALANCE}
        return cls(state=state, plan=plan, groups=groups, decoder=decoder)

    def payload(self) -> dict[str, torch.Tensor]:
        """The PEFT state the server sends (CPU tensors, as on the wire)."""
        return {k: v.detach().cpu().clone() for k, v in self.state.items()}

    def attack(self, obs: Observation, victim: Victim) -> Reconstruction:
        """Features of ``obs``'s batch read off the update, their zero-shot labels, and the decoded images.

        A multi-step update is read through its gradient view (``-delta / (eta E)``): exact for one local step,
        an approximation after more (the crafted weights move)."""
        t0 = time.perf_counter()
        digest = obs.digest()
        obs = gradient_view(obs)
        # the update of the crafted weights as a function of the batch: it confirms the bins that hold one image
        est = imprint_features(obs, self.plan, model=AdapterGradientModel(victim, weights=self.state))
        feats = est.features.to(victim.fixed_text.device)
        with torch.no_grad():  # the server's zero-shot class of each feature (the text tower is public)
            labels = (F.normalize(feats, dim=-1) @ victim.text_features().t()).argmax(-1)
        size = victim.clip_info.image_size
        if self.decoder is not None:
            images = decoder_images(self.decoder, feats)
        else:
            images = torch.zeros(feats.shape[0], 3, size, size, device=feats.device)
        return Reconstruction(
            images=images.cpu(), labels=labels.cpu(), label_source="zero-shot class of the recovered feature",
            attack=ATTACK_NAME, history={}, features=feats.cpu(),
            meta={"attack_config": {"groups": self.groups, "hidden": int(self.state["adapter.fc1.weight"].shape[0]),
                                    "decoder": self.decoder is not None},
                  "observation": obs.meta, "seconds": time.perf_counter() - t0,
                  "feature_recovery": {"separated": est.separated, "batch": obs.batch_size},
                  "observation_digest": digest},
        )


class MaliciousStrategy(AttackingStrategy):
    """The attacking strategy of a malicious server: every round it sends ``server``'s crafted adapter weights
    instead of the global state (the wrapped strategy configures the round with them, so the clients start
    from them and every update is recorded against them) and attacks each reply with
    :meth:`MaliciousServer.attack` on ``victim`` (the attacker's copy of the task's model). The model the
    federation trains is sacrificed: the server only wants the replies. Other arguments: those of
    :class:`~clipleak.fl.strategy.AttackingStrategy`."""

    def __init__(self, server: MaliciousServer, victim: Victim, recipe: Recipe, base_meta: dict[str, Any],
                 inner: Strategy | None = None, **kwargs: Any) -> None:
        if recipe.peft.method != "adapter":
            raise ClipleakError("the malicious server crafts CLIP-Adapter weights: run the federation with "
                                "--method adapter")
        super().__init__(recipe, base_meta, inner, attack=lambda obs: server.attack(obs, victim), **kwargs)
        self.server = server

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        crafted = self.server.payload()
        current = arrays.to_torch_state_dict()
        if set(crafted) != set(current) or any(crafted[k].shape != current[k].shape for k in crafted):
            raise ClipleakError("the crafted weights do not match the federation's adapter parameters")
        return super().configure_train(server_round, ArrayRecord(crafted), config, grid)
