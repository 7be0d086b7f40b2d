"""The malicious server: it sends crafted CLIP-Adapter weights instead of the global model's and reads the
batch's features off each reply (:mod:`clipleak.recover.malicious`), then decodes them to images.

The architecture the task defines is unchanged (same adapter, same width, same ratio); only the values of
``adapter.fc1.weight`` and ``adapter.fc2.weight`` that the server sends differ. Crafting uses the public split
alone. :class:`MaliciousServer` is what a Flower strategy or a benchmark calls: :meth:`MaliciousServer.craft`
once per round, :meth:`MaliciousServer.attack` per reply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import ImageSet
from ..errors import ClipleakError
from ..peft import Victim
from ..priors import FeatureDecoder, decoder_images
from ..records import Observation, Reconstruction, gradient_view
from ..recover import public_features
from ..recover.malicious import ImprintPlan, craft_imprint, imprint_features

ATTACK_NAME = "malicious-imprint"


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
        est = imprint_features(obs, self.plan)
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
