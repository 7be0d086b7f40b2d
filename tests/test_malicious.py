"""The malicious server's imprint weights for CLIP-Adapter (recover.malicious, fl.malicious): one update of a
batch of 32 gives back most of its features exactly, which the same read-out of an honest update does not;
the weights keep the task's architecture; the client-side check flags them and not honest ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from clipleak.client import load_private, sample_batch, share
from clipleak.data import DataSpec, load_public
from clipleak.errors import ClipleakError
from clipleak.fl.malicious import MaliciousServer
from clipleak.models import build_model
from clipleak.peft import PeftConfig, build_victim
from clipleak.recover import adapter_features, public_features
from clipleak.recover.malicious import check_weights, craft_imprint, imprint_features

EXACT = 0.99
"""A recovered feature counts when its cosine to its true feature (one-to-one pairing) exceeds this. Stricter
than 0.9 on purpose: a trained CLIP's features of one class have cosines near 0.98, so a mixture of two
same-class images would pass 0.9."""


@pytest.fixture(scope="module")
def world(short_run):
    clip = build_model("tiny-32", short_run[0])
    spec = DataSpec()
    public = load_public(spec, 32)
    val = load_private(spec, 32, "validation")  # the client's images (validation split: tests tune nothing)
    return clip, public, val, public_features(clip, public)


def exact_share(recovered: torch.Tensor, victim, images: torch.Tensor) -> float:
    """Share of the true features with a recovered one (paired one-to-one) of cosine above EXACT."""
    with torch.no_grad():
        true = F.normalize(victim.raw_image_features(images), dim=-1)
    cos = (F.normalize(recovered.float(), dim=-1) @ true.t()).numpy()
    r, c = linear_sum_assignment(-cos)
    return float((cos[r, c] > EXACT).mean())


def setup(world, reduction: int, groups: int, seed: int = 0):
    clip, public, val, feats = world
    honest = build_victim(clip, list(val.classnames), PeftConfig(method="adapter", adapter_reduction=reduction))
    malicious = build_victim(clip, list(val.classnames), PeftConfig(method="adapter", adapter_reduction=reduction))
    server = MaliciousServer.craft(malicious, public, groups=groups, seed=seed)
    malicious.load_peft_state(server.payload())
    return honest, malicious, server


def test_crafted_weights_keep_the_task_architecture(world):
    honest, malicious, server = setup(world, 4, 2)
    assert {k: v.shape for k, v in server.payload().items()} == {k: v.shape for k, v in honest.peft_state().items()}
    assert malicious.adapter is not None and malicious.adapter.fc1.weight.shape == (32, 128)  # the task's width
    with pytest.raises(ClipleakError):
        craft_imprint(world[3], 4, groups=5)


def test_one_image_comes_back_exactly(world):
    _, _, val, _ = world
    _, malicious, server = setup(world, 4, 1)
    x, y, _ = sample_batch(val, 1, seed=5)
    est = imprint_features(share(malicious, x, y), server.plan)
    assert exact_share(est.features, malicious, x) == 1.0


def test_batch_of_32_comes_back_from_crafted_weights_and_not_from_honest_ones(world):
    """Width 128 (reduction 1), 8 groups: at least 80% of a batch of 32 come back with cosine > 0.99 from one
    update, confirmed as single images; the honest init's update of the same batch gives at most 25% through
    the same read-out and through the honest-but-curious clustering."""
    _, _, val, _ = world
    honest, malicious, server = setup(world, 1, 8)
    shares, honest_shares, clustered = [], [], []
    for seed in (11, 12):
        x, y, _ = sample_batch(val, 32, seed=seed)
        est = imprint_features(share(malicious, x, y), server.plan)
        shares.append(exact_share(est.features, malicious, x))
        assert est.separated >= 0.8 * 32
        obs_h = share(honest, x, y)
        honest_shares.append(exact_share(imprint_features(obs_h, server.plan).features, honest, x))
        clustered.append(exact_share(adapter_features(obs_h, honest).features, honest, x))
    assert min(shares) >= 0.8, shares
    assert max(honest_shares) <= 0.25, honest_shares
    assert max(clustered) <= 0.25, clustered


def test_the_modelled_update_tells_single_image_bins_and_sends_spare_slots_to_crowded_ones(world):
    """One group at the task's width, batch 32: with the crafted adapter's gradient model, the bins that hold
    one image (known here from the true features) are exactly the ones confirmed, and the slots of images no
    bin shows alone repeat bins that hold several; without the model nothing is confirmed."""
    from clipleak.recover.adapter import AdapterGradientModel

    _, _, val, _ = world
    _, malicious, server = setup(world, 4, 1)
    x, y, _ = sample_batch(val, 32, seed=13)
    obs = share(malicious, x, y)
    model = AdapterGradientModel(malicious)
    est = imprint_features(obs, server.plan, model=model)
    with torch.no_grad():
        true = F.normalize(malicious.raw_image_features(x), dim=-1)
    bins = server.plan.bins(true)[:, 0]
    count = {int(k): int((bins == k).sum()) for k in bins.unique() if int(k) > 0}
    feats = F.normalize(est.features.double(), dim=-1)
    own_bin = server.plan.bins(feats.float())[:, 0]
    alone = [k for k, c in count.items() if c == 1]
    assert 4 <= est.separated == len(alone) < 32, (est.separated, count)
    assert sorted(int(k) for k in own_bin[: est.separated]) == sorted(alone)
    assert exact_share(est.features[: est.separated], malicious, x) == 1.0  # every confirmed image is exact
    spare = own_bin[len(count):]  # the slots beyond one per non-empty bin
    assert len(spare) == 32 - len(count) > 0 and all(count[int(k)] >= 2 for k in spare), (spare, count)
    assert imprint_features(obs, server.plan).separated == 0


def test_task_width_gives_back_part_of_a_batch_of_32(world):
    """At the task's width (32 units for 32 images, one group) a share of the batch still comes back exactly,
    far above the honest update's."""
    _, _, val, _ = world
    honest, malicious, server = setup(world, 4, 1)
    x, y, _ = sample_batch(val, 32, seed=13)
    got = exact_share(imprint_features(share(malicious, x, y), server.plan).features, malicious, x)
    base = exact_share(adapter_features(share(honest, x, y), honest).features, honest, x)
    assert got >= 0.25 and got >= base + 0.15, (got, base)


def test_attack_decodes_one_image_per_slot(world):
    _, _, val, _ = world
    _, malicious, server = setup(world, 1, 8)
    x, y, _ = sample_batch(val, 16, seed=3)
    obs = share(malicious, x, y)
    rec = server.attack(obs, malicious)
    assert rec.images.shape == x.shape and rec.labels.shape == y.shape
    assert rec.meta["observation_digest"] == obs.digest()
    assert exact_share(rec.features, malicious, x) >= 0.8


def test_client_check_flags_crafted_weights_and_not_honest_ones(world):
    clip, public, val, _ = world
    x, _, _ = sample_batch(val, 32, seed=1)
    for reduction in (4, 1):
        for seed in range(5):
            honest = build_victim(clip, list(val.classnames),
                                  PeftConfig(method="adapter", adapter_reduction=reduction, init_seed=seed))
            own = F.normalize(honest.raw_image_features(x).detach(), dim=-1)
            assert not check_weights(honest.peft_state(), own).flagged
        for groups in (1, 4):
            _, _, server = setup(world, reduction, groups, seed=seed)
            assert check_weights(server.payload(), own).flagged


def test_strategy_sends_the_crafted_weights_and_attacks_the_replies(world):
    """The Flower strategy option: the wrapped strategy configures the round with the crafted weights (and the
    round's recorded start is them), and the strategy's attack reads a reply's batch back."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from clipleak.fl.malicious import MaliciousStrategy
    from clipleak.fl.settings import Recipe

    class Capture(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            self.sent = arrays.to_torch_state_dict()
            return []

    _, _, val, _ = world
    honest, malicious, server = setup(world, 4, 8)
    inner = Capture(fraction_evaluate=0.0)
    strategy = MaliciousStrategy(server, malicious, Recipe(peft=PeftConfig(method="adapter"), batch_size=8), {}, inner)
    strategy.configure_train(1, ArrayRecord(honest.peft_state()), ConfigRecord({}), grid=None)
    for k, v in server.payload().items():
        assert torch.equal(inner.sent[k], v) and torch.equal(strategy.global_states[1][k], v)
        assert not torch.equal(v, honest.peft_state()[k])
    assert strategy.attack is not None
    x, y, _ = sample_batch(val, 8, seed=4)
    rec = strategy.attack(share(malicious, x, y))
    assert exact_share(rec.features, malicious, x) >= 0.75
    with pytest.raises(ClipleakError):
        MaliciousStrategy(server, malicious, Recipe(peft=PeftConfig(method="coop")), {}, Capture())
