"""Federated runs on Flower: partitions, the attacking strategy's recording and aggregation (in process, no
Ray), E = 1 updates against client.share's gradient, resuming, the CLI; a Ray simulation (slow)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx

from clipleak.client import share
from clipleak.data import DataSpec
from clipleak.fl import (
    AttackingFedAvg,
    AttackingStrategy,
    ClientData,
    InProcessGrid,
    Recipe,
    RunSpec,
    make_client_app,
    partition_indices,
    server_identity,
    server_main,
    step_positions,
    truth_path,
)
from clipleak.fl.server_app import Server, finished_rounds, load_state
from clipleak.fl.settings import CONFIG_KEY, ROUND_KEY
from clipleak.fl.strategy import in_content_order
from clipleak.peft import PeftConfig
from clipleak.privacy import DpSetting
from clipleak.records import Truth, distinct_images, gradient_view


def test_partitions_cover_the_split_once():
    labels = torch.arange(100) % 10
    for part in ("iid", "dirichlet:0.3", "dirichlet:100"):
        parts = partition_indices(labels, 4, part, seed=3)
        allidx = torch.cat(parts).sort().values
        assert torch.equal(allidx, torch.arange(100)), part
        assert min(p.numel() for p in parts) >= 1
        again = partition_indices(labels, 4, part, seed=3)
        assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    # small alpha: a client sees few classes; IID: all of them
    iid = partition_indices(labels, 4, "iid", seed=0)
    skew = partition_indices(labels, 4, "dirichlet:0.05", seed=0)
    assert min(labels[p].unique().numel() for p in iid) >= 8
    assert min(labels[p].unique().numel() for p in skew) < 8


def test_step_positions_and_distinct_images():
    for n, e, b in ((1, 10, 1), (4, 10, 1), (16, 5, 2), (3, 2, 8), (10, 1, 4)):
        steps = step_positions(n, e, b, seed=1)
        assert len(steps) == e and all(s.numel() == min(b, n) for s in steps)
        assert all(s.unique().numel() == s.numel() for s in steps)  # no repeat inside a batch
        assert torch.cat(steps).unique().numel() == distinct_images(e, b, n)


def _setup(tmp_path, method="adapter", clients=3, **recipe_kw):
    recipe = Recipe(peft=PeftConfig(method=method), weights=None, **recipe_kw)
    data = ClientData(weights=None, client_size=5, seed=11, truth_dir=str(tmp_path / "truth"))
    spec = RunSpec(out=str(tmp_path / "out"), clients=clients, rounds=1, recipe=recipe, attack=None)
    return recipe, data, spec


def _one_round(tmp_path, method="adapter", clients=3, **recipe_kw):
    recipe, data, spec = _setup(tmp_path, method, clients, **recipe_kw)
    server = Server(spec)
    strategy = AttackingFedAvg(recipe, server.base_meta, min_train_nodes=clients, min_available_nodes=clients)
    grid = InProcessGrid(make_client_app(data), clients)
    start = server.victim.peft_state()
    with server_identity():
        msgs = list(strategy.configure_train(1, ArrayRecord(start), ConfigRecord({CONFIG_KEY: recipe.to_json()}),
                                             grid))
        replies = list(grid.send_and_receive(msgs))
        arrays, metrics = strategy.aggregate_train(1, replies)
        ordered = in_content_order(replies)  # as the strategy passes them
        plain, _ = FedAvg(min_train_nodes=clients, min_available_nodes=clients).aggregate_train(1, ordered)
    return recipe, data, server, strategy, start, replies, arrays, plain


def test_wrapping_other_strategies_aggregates_as_they_do(tmp_path):
    """AttackingStrategy around FedAdam / FedProx / FedMedian: the same arrays as the strategy alone on the
    same replies (in content order), its own configure_train (FedProx's proximal-mu reaches the clients), every
    update recorded."""
    recipe, _, server, _, start, replies, _, fedavg = _one_round(tmp_path, local_steps=2, batch_size=1, lr=0.5)
    kw = {"min_train_nodes": 3, "min_available_nodes": 3}
    grid = InProcessGrid(make_client_app(ClientData(weights=None, client_size=5, seed=11,
                                                    truth_dir=str(tmp_path / "t2"))), 3)
    for make in (lambda: FedAdam(**kw), lambda: FedProx(proximal_mu=0.3, **kw), lambda: FedMedian(**kw)):
        wrapped = AttackingStrategy(recipe, server.base_meta, make())
        alone = make()
        with server_identity():
            msgs = list(wrapped.configure_train(1, ArrayRecord(start), ConfigRecord({CONFIG_KEY: recipe.to_json()}),
                                                grid))
            list(alone.configure_train(1, ArrayRecord(start), ConfigRecord({CONFIG_KEY: recipe.to_json()}), grid))
            got, _ = wrapped.aggregate_train(1, copy.deepcopy(replies))  # FedMedian pops the replies' arrays
            ref, _ = alone.aggregate_train(1, in_content_order(copy.deepcopy(replies)))
        name = type(alone).__name__
        assert len(msgs) == 3 and all(m.content.config_records["config"][ROUND_KEY] == 1 for m in msgs)
        if name == "FedProx":
            assert all(m.content.config_records["config"]["proximal-mu"] == 0.3 for m in msgs)
        assert got is not None and ref is not None
        g, r, f = got.to_torch_state_dict(), ref.to_torch_state_dict(), fedavg.to_torch_state_dict()
        assert all(torch.equal(g[k], r[k]) for k in start), name
        if name != "FedProx":  # FedProx aggregates as FedAvg; the others do not
            assert any(not torch.allclose(g[k].float(), f[k].float()) for k in start), name
        obs = wrapped.observations[1]
        assert sorted(o.meta["node_id"] for o in obs) == [1, 2, 3]
        for o, m in zip(obs, sorted(replies, key=lambda m: m.metadata.src_node_id), strict=True):
            sent = m.content.array_records["arrays"].to_torch_state_dict()
            assert all(torch.equal(o.gradients[k], sent[k].float() - start[k].float()) for k in start)


def test_strategy_records_every_update_and_aggregates_as_fedavg(tmp_path):
    recipe, _, _, strategy, start, replies, arrays, plain = _one_round(tmp_path, local_steps=3, batch_size=2,
                                                                        lr=0.5)
    obs = strategy.observations[1]
    assert len(obs) == 3 == len(replies)
    assert sorted(o.meta["node_id"] for o in obs) == [1, 2, 3]
    for o in obs:
        assert o.meta["kind"] == "update" and o.meta["round"] == 1
        assert (o.meta["local_steps"], o.meta["batch_size"], o.meta["lr"]) == (3, 2, 0.5)
        assert o.meta["num_examples"] == 5 and o.meta["distinct_images"] == 5
        assert "defense" not in o.meta
        assert all(torch.equal(o.peft_state[k], start[k]) for k in start)  # the round's global state
        assert max(float(v.abs().max()) for v in o.gradients.values()) > 0
    assert arrays is not None and plain is not None
    # the order the wrapped strategy sums in does not depend on the order the replies arrived in
    assert [id(m) for m in in_content_order(replies[::-1])] == [id(m) for m in in_content_order(replies)]
    got, ref = arrays.to_torch_state_dict(), plain.to_torch_state_dict()
    weights = torch.tensor([float(o.meta["num_examples"]) for o in obs])
    for k in start:
        assert torch.equal(got[k], ref[k])  # the wrapped FedAvg's own result, untouched
        mean_update = sum(w * o.gradients[k] for w, o in zip(weights, obs, strict=True)) / weights.sum()
        assert torch.allclose(got[k], start[k] + mean_update, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["adapter", "coop"])
def test_e1_update_is_minus_eta_times_the_shared_gradient(tmp_path, method):
    recipe, data, server, strategy, start, _, _, _ = _one_round(tmp_path, method, clients=2, local_steps=1,
                                                               batch_size=2, lr=0.3)
    victim = server.victim
    victim.load_peft_state(start)
    for o in strategy.observations[1]:
        truth = Truth.load(truth_path(data.truth_dir, o.meta["node_id"], 1))
        assert truth.images.shape[0] == 2 == o.meta["distinct_images"]
        grad = share(victim, truth.images, truth.labels).gradients
        view = gradient_view(o)
        assert view.meta["kind"] == "gradient" and view.batch_size == 2
        for k, g in grad.items():
            scale = float(g.abs().max())
            assert scale > 0
            assert float((o.gradients[k] + recipe.lr * g).abs().max()) <= 1e-5 * recipe.lr * scale, k
            assert float((view.gradients[k] - g).abs().max()) <= 1e-5 * scale, k


def test_coop_trajectory_model_replays_a_multi_step_update(tmp_path):
    """The server's replay of E local steps from the images' features and labels (CoopTrajectoryModel)
    reproduces the recorded CoOp update (E = 3, B = 2, n = 5: steps over different, wrapping batches), and
    its public step pattern numbers the images as the truth file does (first use)."""
    from clipleak.recover import CoopTrajectoryModel, step_batches

    for n, e, b in ((1, 10, 1), (4, 10, 1), (16, 5, 2), (3, 2, 8), (5, 3, 2)):
        steps = step_positions(n, e, b, seed=3)
        first: dict[int, int] = {}
        for st in steps:
            for i in st.tolist():
                first.setdefault(int(i), len(first))
        assert [[first[int(i)] for i in st.tolist()] for st in steps] == step_batches(e, b, n)
    recipe, data, server, strategy, start, *_ = _one_round(tmp_path, "coop", clients=2, local_steps=3,
                                                           batch_size=2, lr=0.3)
    victim = server.victim
    victim.load_peft_state(start)
    model = CoopTrajectoryModel(victim, 3, 2, 5, 0.3)
    assert model.distinct == 5
    for o in strategy.observations[1]:
        truth = Truth.load(truth_path(data.truth_dir, o.meta["node_id"], 1))
        with torch.no_grad():
            feats = victim.image_features(truth.images)
        sim = model.simulate(feats[None], truth.labels[None])[0]
        upd = o.gradients["prompt.ctx"].reshape(-1)
        assert float((sim - upd).norm()) <= 1e-4 * float(upd.norm())
        wrong = model.simulate(feats[None], ((truth.labels + 1) % 10)[None])[0]
        assert float((wrong - upd).norm()) > 1e-2 * float(upd.norm())


def test_coop_update_fit_finds_the_feature_and_label_among_public_starts(tmp_path):
    """coop_update_features on an E = 3 CoOp update of one image (n = 1): with the image's own feature hidden
    among random public ones, the screen and the fit return it (cosine 1, residual ~0) with its label."""
    from clipleak.recover import coop_update_features

    recipe, _, spec = _setup(tmp_path, "coop", clients=1, local_steps=3, batch_size=1, lr=0.3)
    data = ClientData(weights=None, client_size=1, seed=5, truth_dir=str(tmp_path / "truth"))
    server = Server(spec)
    strategy = AttackingFedAvg(recipe, server.base_meta, min_train_nodes=1, min_available_nodes=1)
    start = server.victim.peft_state()
    grid = InProcessGrid(make_client_app(data), 1)
    with server_identity():
        msgs = list(strategy.configure_train(1, ArrayRecord(start), ConfigRecord({CONFIG_KEY: recipe.to_json()}),
                                             grid))
        strategy.aggregate_train(1, list(grid.send_and_receive(msgs)))
    o = strategy.observations[1][0]
    truth = Truth.load(truth_path(data.truth_dir, o.meta["node_id"], 1))
    assert o.meta["distinct_images"] == 1
    victim = server.victim
    victim.load_peft_state(start)
    with torch.no_grad():
        true_f = torch.nn.functional.normalize(victim.image_features(truth.images), dim=-1)
    g = torch.Generator().manual_seed(0)
    pf = torch.nn.functional.normalize(true_f + 0.3 * torch.randn(40, true_f.shape[1], generator=g), dim=-1)
    pl = torch.arange(40) % 10
    y = int(truth.labels[0])
    pf[y + 10] = true_f[0]  # the truth, hidden among 40 public features (4 per label)
    fit = coop_update_features(gradient_view(o), victim, pf, pl, per_class=4, iterations=5)
    assert int(fit.labels[0]) == y and fit.residual < 1e-3
    assert float((fit.features[0] * true_f[0]).sum()) > 0.999


def test_dp_update_records_defense_and_epsilon(tmp_path):
    dp = DpSetting("per-example", clip=1.0, noise_multiplier=1.0, delta=1e-5, awaiting_schedule=True)
    _, _, _, strategy, *_ = _one_round(tmp_path, clients=2, local_steps=2, batch_size=1, lr=0.1, dp=dp)
    d = strategy.observations[1][0].meta["defense"]
    assert d["mechanism"] == "per-example" and d["noise_multiplier"] == 1.0 and d["delta"] == 1e-5
    assert d["epsilon_so_far"] is not None and d["epsilon_so_far"] > 0
    assert strategy.round_info[1]["epsilon_so_far"] == pytest.approx(d["epsilon_so_far"])


def test_inprocess_run_resumes_without_recomputing(tmp_path):
    _, data, spec = _setup(tmp_path, local_steps=1, batch_size=1, lr=0.5)
    spec.attack = "featmatch"
    spec.attack_settings = {"iterations": 2, "restarts": 1, "prior": "tv"}
    grid = InProcessGrid(make_client_app(data), 2)
    spec.clients = 2
    with server_identity():
        server_main(grid, spec)
    first = (tmp_path / "out" / "rounds" / "round-001" / "global.safetensors").stat().st_mtime_ns
    assert finished_rounds(load_state(spec.out)) == 1
    spec.rounds = 2
    with server_identity():
        server_main(InProcessGrid(make_client_app(data), 2), spec)
    state = load_state(spec.out)
    assert finished_rounds(state) == 2 and len(state["rounds"]["2"]["attacked"]) == 2
    assert (tmp_path / "out" / "rounds" / "round-001" / "global.safetensors").stat().st_mtime_ns == first
    spec.recipe = Recipe(peft=PeftConfig(method="adapter"), weights=None, lr=0.01)
    from clipleak.errors import ClipleakError

    with pytest.raises(ClipleakError, match="different run"), server_identity():
        server_main(InProcessGrid(make_client_app(data), 2), spec)


def test_leakage_summary_pools_images():
    """Two updates of 4 images re-identified at 50% and 25%: 3 of 8 images, Wilson 14-69%, above chance 10%;
    PSNR a bootstrap over the 8 images."""
    from clipleak.fl.run import leakage_summary

    def entry(rnd, reid, psnr):
        return {"round": rnd, "images": 4, "label_accuracy": 1.0,
                "psnr": {k: sum(psnr) / 4 for k in ("attack", "prototype", "public-nn")},
                "psnr_images": {k: psnr for k in ("attack", "prototype", "public-nn")},
                "ssim": {k: 0.5 for k in ("attack", "prototype", "public-nn")},
                "reid": {"attack": reid, "prototype": 0.1, "public-nn": 0.0}}

    s = leakage_summary([entry(1, 0.5, [10.0, 11.0, 12.0, 13.0]), entry(2, 0.25, [14.0, 15.0, 16.0, 17.0]),
                         {"round": 2, "images": 1, "error": "the attack made 2 images"}], 0.1)
    iv = s["reid_interval"]["attack"]
    assert s["scored"] == 2 and s["attacked_updates"] == 3 and s["images"] == 8
    assert iv["value"] == 0.375 and iv["n"] == 8
    assert iv["low"] == pytest.approx(0.1368, abs=1e-4) and iv["high"] == pytest.approx(0.6943, abs=1e-4)
    assert s["at_chance"] is False and s["reid_interval"]["public-nn"]["value"] == 0.0
    assert s["psnr_interval"]["attack"]["value"] == 13.5 and s["psnr_interval"]["attack"]["n"] == 8
    assert s["label_accuracy_interval"]["low"] == pytest.approx(0.6756, abs=1e-4)
    assert leakage_summary([entry(1, 0.25, [10.0] * 4)], 0.25)["at_chance"] is True


def test_run_report_carries_intervals_and_the_clients_seed(tmp_path):
    """An in-process run's report: per update, per round and over the run every rate with its interval;
    chance from reid_k; the clients' data seed recorded; a resume with another data seed refused."""
    from clipleak.errors import ClipleakError
    from clipleak.fl.run import evaluate_run, run_federated

    _, data, spec = _setup(tmp_path, clients=2, local_steps=1, batch_size=2, lr=0.5)
    spec.attack = "featmatch"
    spec.attack_settings = {"iterations": 2, "restarts": 1, "prior": "tv"}
    run_federated(spec, data, engine="inprocess")
    m = evaluate_run(spec.out, data.truth_dir, reid_k=5)
    s = m["summary"]
    assert s["scored"] == 2 and s["images"] == 4 and s["chance"] == 0.2
    assert s["reid_interval"]["attack"]["n"] == 4 and s["psnr_interval"]["attack"]["n"] == 4
    assert m["by_round"]["1"]["reid_interval"]["attack"] == s["reid_interval"]["attack"]
    assert all(c["reid_interval"]["attack"]["n"] == 2 for c in m["clients"])
    assert m["client_data"]["seed"] == 11
    page = (tmp_path / "out" / "report" / "report.html").read_text()
    assert "Leakage per round" in page and "(n=4)" in page and "chance 20%" in page and "chance 10%" not in page
    assert "data seed 11" in page
    # every truth is the one of the very update attacked: the client's digest of what it sent is the server's
    assert [c["truth_matches_update"] for c in m["clients"]] == [True, True]
    from clipleak.fl.client_app import truth_path
    from clipleak.records import Truth
    tp = truth_path(data.truth_dir, m["clients"][0]["node_id"], 1)
    t = Truth.load(tp)
    t.meta["reply_sha256"] = "0" * 64  # a truth from another run, say
    t.save(tp)
    with pytest.raises(ClipleakError, match="belongs to another update"):
        evaluate_run(spec.out, data.truth_dir, reid_k=5)
    data.seed = 12
    with pytest.raises(ClipleakError, match="seed 11 \\(now 12\\)"):
        run_federated(spec, data, engine="inprocess")


def test_resumed_fedadam_run_equals_an_uninterrupted_one(tmp_path):
    """FedAdam's moments are saved with each round and restored on resume: 2 rounds + 1 resumed round give
    the same global states as 3 rounds in one go; with the saved moments deleted the resumed run differs."""
    from safetensors.torch import load_file

    def run(name, rounds_list, drop_state=False):
        _, data, spec = _setup(tmp_path / name, clients=2, local_steps=1, batch_size=1, lr=0.5)
        spec.strategy = "fedadam"
        for i, r in enumerate(rounds_list):
            if drop_state and i:
                (tmp_path / name / "out" / "rounds" / "round-002" / "strategy.safetensors").unlink()
            spec.rounds = r
            with server_identity():
                server_main(InProcessGrid(make_client_app(data), 2), spec)
        return [load_file(str(tmp_path / name / "out" / "rounds" / f"round-{k:03d}" / "global.safetensors"))
                for k in (1, 2, 3)]

    straight = run("straight", [3])
    resumed = run("resumed", [2, 3])
    saved = load_file(str(tmp_path / "resumed" / "out" / "rounds" / "round-002" / "strategy.safetensors"))
    assert {k.split("/")[0] for k in saved} == {"m_t", "v_t"}
    for a, b in zip(straight, resumed, strict=True):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    fresh = run("fresh", [2, 3], drop_state=True)
    assert all(torch.equal(straight[1][k], fresh[1][k]) for k in straight[1])
    assert any(not torch.allclose(straight[2][k], fresh[2][k]) for k in straight[2])


def test_cli_fl_run_help_has_an_example():
    from typer.testing import CliRunner

    from clipleak.cli import app

    res = CliRunner().invoke(app, ["fl", "run", "--help"], terminal_width=200)
    assert res.exit_code == 0 and "Example: clipleak fl run" in res.output


@pytest.mark.slow
def test_two_client_one_round_simulation(tmp_path):
    """Flower's simulation engine (Ray): 2 clients, 1 round, every update attacked, report written."""
    code = f"""
import json, torch
torch.set_num_threads(1)
from clipleak.fl import ClientData, Recipe, RunSpec
from clipleak.fl.run import evaluate_run, run_federated
from clipleak.peft import PeftConfig
spec = RunSpec(out={str(tmp_path / 'out')!r}, clients=2, rounds=1, attack='featmatch',
               attack_settings={{'iterations': 2, 'restarts': 1, 'prior': 'tv'}},
               recipe=Recipe(peft=PeftConfig(method='adapter'), weights=None, local_steps=1, batch_size=1, lr=0.5))
data = ClientData(weights=None, client_size=4, truth_dir={str(tmp_path / 'truth')!r})
state = run_federated(spec, data, engine='simulation')
m = evaluate_run(spec.out, data.truth_dir)
print(json.dumps({{'rounds': len(state['rounds']), 'scored': m['summary']['scored'],
                  'matched': [c['truth_matches_update'] for c in m['clients']]}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"rounds": 1, "scored": 2, "matched": [True, True]}
    assert (tmp_path / "out" / "report" / "report.html").is_file()


def test_data_split_is_what_clients_and_server_share(tmp_path):
    _, _, spec = _setup(tmp_path)
    server = Server(spec)
    assert DataSpec.from_dict(server.base_meta["data"]).same_split(DataSpec.parse("mnist"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_deployment_engine_on_localhost(tmp_path):
    """SuperLink + 2 SuperNodes as separate processes on 127.0.0.1, the Flower App in deploy/flower, 1 round."""
    import os
    import shutil
    import time
    from pathlib import Path

    if shutil.which("flower-superlink") is None:
        pytest.skip("flower-superlink not on PATH")
    root = Path(__file__).resolve().parents[1]
    link, home = _free_port(), tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(root / "src")}
    procs = [subprocess.Popen(["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(3)
        for i in range(2):
            cfg = (f"partition-id={i} num-partitions=2 client-size=3 seed=5 "
                   f"truth-dir='{tmp_path / 'truth'}' weights=''")
            procs.append(subprocess.Popen(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                                           "--port", str(_free_port()), "--node-config", cfg], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(4)
        run_cfg = (f"out='{tmp_path / 'out'}' rounds=1 weights='' attack='none'")
        res = subprocess.run(["flwr", "run", str(root / "deploy" / "flower"), "test", "--stream",
                              "--run-config", run_cfg], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        state = load_state(tmp_path / "out")
        assert finished_rounds(state) == 1 and len(state["rounds"]["1"]["clients"]) == 2
        assert len(list((tmp_path / "truth").glob("node-*/round-001.truth.safetensors"))) == 2
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_secagg_settings_tolerance_and_checks():
    from clipleak.errors import ClipleakError
    from clipleak.fl.secagg import SecAggSettings

    s = SecAggSettings(max_weight=4.0, clipping_range=2.0, quantization_range=2**20)
    assert s.weights([1, 3]) == [0.25, 0.75]  # max weight a power of two: the FedAvg weights are exact
    # two clients, each off by less than one level 2 * 2 / 2**20, summed and divided by sum dq = 1
    assert s.tolerance([1, 3], max_abs=1.0) == pytest.approx(2 * 4 / 2**20 + 2 * 2.0**-23)
    rough = SecAggSettings(max_weight=1000.0, quantization_range=2**20)
    assert rough.tolerance([1, 3], 1.0) > s.tolerance([1, 3], 1.0)  # weights rounded, coarser levels
    with pytest.raises(ClipleakError, match="at least 2 clients"):
        s.check_clients(1)
    with pytest.raises(ClipleakError, match="modulus"):
        SecAggSettings(quantization_range=2**30).check_clients(8)
    with pytest.raises(ClipleakError, match="secagg settings"):
        SecAggSettings(modulus_range=3 * 2**20)
    with pytest.raises(ClipleakError, match="needs the individual updates"):
        RunSpec(out="x", clients=2, strategy="fedmedian", secagg={})


class _RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every reply the server receives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies = []

    def send_and_receive(self, messages, *, timeout=None):
        out = super().send_and_receive(messages, timeout=timeout)
        self.replies.extend(out)
        return out


def test_secagg_server_reads_only_the_aggregate_and_attacks_it(tmp_path):
    """Three clients through Flower's SecAgg+ workflow and mod (in-process transport): no reply carries a
    client's parameters, the server keeps no per-client update, and the aggregate is attacked as one batch
    of all the clients' images, scored against the union of their truth."""
    from clipleak.fl.run import evaluate_run
    from clipleak.fl.secagg import secagg_client_app
    from clipleak.fl.strategy import aggregate_path
    from clipleak.records import Observation

    out, truth = tmp_path / "out", tmp_path / "truth"
    spec = RunSpec(out=str(out), clients=3, rounds=1, secagg={"max_weight": 1.0},
                   recipe=Recipe(peft=PeftConfig(method="adapter"), weights=None, local_steps=1, batch_size=1, lr=0.5),
                   attack_settings={"iterations": 2, "restarts": 1, "prior": "tv"})
    data = ClientData(weights=None, client_size=1, truth_dir=str(truth))
    grid = _RecordingGrid(secagg_client_app(data), 3)
    with server_identity():
        state = server_main(grid, spec)
    assert state["secure_aggregation"]["max_weight"] == 1.0 and finished_rounds(state) == 1
    # secaggplus_mod cleared every client's arrays before its reply left
    assert grid.replies and all(len(r) == 0 for m in grid.replies for r in m.content.array_records.values())
    rdir = out / "rounds" / "round-001"
    assert not (rdir / "updates").exists() and not list((rdir / "attacks").glob("node-*"))
    obs = Observation.load(aggregate_path(out, 1))
    assert obs.meta["batch_size"] == 3 and obs.meta["num_examples"] == 3 and obs.meta["node_id"] is None
    assert obs.meta["secure_aggregation"]["clients"] == [1, 2, 3]
    assert state["rounds"]["1"]["aggregate_attacked"] and state["rounds"]["1"]["attacked"] == []
    m = evaluate_run(out, truth)
    (entry,) = m["clients"]
    assert entry["aggregate_of"] == [1, 2, 3] and entry["images"] == 3 and "error" not in entry
    assert m["summary"]["images"] == 3 and m["secure_aggregation"] == spec.secagg


def test_plain_round_repeats_bitwise_whatever_order_flower_samples(tmp_path):
    """Flower samples the round's nodes with Python's unseeded global generator; the replies reach the wrapped
    FedAvg in the order of their contents, so its float sum (the next global state) is the same bit for bit in
    every run; and that order does not depend on the node ids (random in Flower's simulation)."""
    import random

    from safetensors.torch import load_file

    states = []
    for name, scramble in (("a", 1), ("b", 2)):
        _, data, spec = _setup(tmp_path / name, clients=5, local_steps=1, batch_size=1, lr=0.5)
        random.seed(scramble)
        with server_identity():
            server_main(InProcessGrid(make_client_app(data), 5), spec)
        states.append(load_file(str(tmp_path / name / "out" / "rounds" / "round-001" / "global.safetensors")))
    a, b = states
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_secagg_round_repeats_bitwise(tmp_path):
    """SecAgg+'s stochastic rounding draws from numpy's global generator; the client seeds it per round from
    its own seed, so the same run gives the same aggregate bit for bit."""
    from clipleak.fl.secagg import secagg_client_app
    from clipleak.fl.strategy import aggregate_path
    from clipleak.records import Observation

    aggregates = []
    for name, scramble in (("a", 1), ("b", 2)):
        out = tmp_path / name
        spec = RunSpec(out=str(out), clients=2, rounds=1, secagg={"max_weight": 1.0}, attack=None,
                       recipe=Recipe(peft=PeftConfig(method="adapter"), weights=None, local_steps=1, batch_size=1,
                                     lr=0.5))
        data = ClientData(weights=None, client_size=1, truth_dir=str(tmp_path / f"truth-{name}"))
        np.random.seed(scramble)  # whatever the process's generator held before
        with server_identity():
            server_main(_RecordingGrid(secagg_client_app(data), 2), spec)
        aggregates.append(Observation.load(aggregate_path(out, 1)).gradients)
    a, b = aggregates
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_secagg_simulation_round_equals_plain_fedavg(tmp_path):
    """Flower's simulation engine (Ray) runs a 2-client SecAgg+ round; the global state the server reads
    equals the plain FedAvg of the same clients' updates (an in-process run without secure aggregation, the
    same clients and seeds) within the tolerance SecAgg+'s quantisation allows, and is not bitwise it."""
    code = f"""
import json, torch
torch.set_num_threads(1)
from safetensors.torch import load_file
from clipleak.fl import ClientData, Recipe, RunSpec
from clipleak.fl.run import run_federated
from clipleak.fl.secagg import SecAggSettings
from clipleak.peft import PeftConfig
from clipleak.records import Observation
recipe = Recipe(peft=PeftConfig(method='coop', class_specific=True), weights=None, local_steps=2, batch_size=2,
                lr=0.5)
runs = {{}}
for name, secagg, engine in (('secagg', {{'max_weight': 4.0, 'clipping_range': 4.0}}, 'simulation'),
                             ('plain', None, 'inprocess')):
    spec = RunSpec(out={str(tmp_path)!r} + '/' + name, clients=2, rounds=1, recipe=recipe, attack=None, secagg=secagg)
    data = ClientData(weights=None, client_size=3, truth_dir={str(tmp_path)!r} + '/truth-' + name)
    state = run_federated(spec, data, engine=engine)
    runs[name] = load_file(spec.out + '/rounds/round-001/global.safetensors')
import pathlib
plain = pathlib.Path({str(tmp_path)!r}) / 'plain' / 'rounds' / 'round-001' / 'updates'
obs = [Observation.load(p) for p in sorted(plain.glob('node-*.safetensors'))]
max_abs = max(float((o.peft_state[k] + o.gradients[k]).abs().max()) for o in obs for k in o.gradients)
tol = SecAggSettings(max_weight=4.0, clipping_range=4.0).tolerance([int(o.meta['num_examples']) for o in obs], max_abs)
diff = max(float((runs['secagg'][k] - runs['plain'][k]).abs().max()) for k in runs['plain'])
step = max(float((o.gradients[k]).abs().max()) for o in obs for k in o.gradients)
print(json.dumps({{'diff': diff, 'tol': tol, 'update': step, 'keys': sorted(runs['secagg']) == sorted(runs['plain']),
                  'updates_dir': (pathlib.Path({str(tmp_path)!r}) / 'secagg/rounds/round-001/updates').exists()}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["keys"] and not out["updates_dir"]
    assert 0 < out["diff"] <= out["tol"]
    assert out["tol"] < 1e-3 * out["update"]  # the quantisation is far below the update it carries


def test_cli_fl_run_secagg_numbers_and_refusals(tmp_path):
    from typer.testing import CliRunner

    from clipleak.cli import app
    from clipleak.cli.fl import secagg_config
    from clipleak.errors import ClipleakError

    assert secagg_config(False, 1.0, 0.5, 8.0, 2**24, None, 2) is None
    cfg = secagg_config(True, 3.0, 0.5, 4.0, 2**20, None, 2)
    assert cfg == {"num_shares": 3, "reconstruction_threshold": 0.5, "clipping_range": 4.0,
                   "quantization_range": 2**20, "max_weight": 2.0}  # an int count of shares, a fraction threshold
    assert isinstance(cfg["num_shares"], int) and secagg_config(True, 1.0, 1.0, 8.0, 2**24, None, None)[
        "max_weight"] == 1024.0
    for extra, message in ((["--clients", "1"], "at least 2 clients"),
                           (["--clients", "2", "--strategy", "fedmedian"], "needs the individual updates")):
        res = CliRunner().invoke(app, ["fl", "run", "--out", str(tmp_path / "o"), "--secagg", *extra],
                                 terminal_width=200)
        assert isinstance(res.exception, ClipleakError) and message in str(res.exception), res.output


def test_malicious_server_run_sends_crafted_weights_and_reads_the_batches(tmp_path):
    """`fl run --malicious`: the clients train from the crafted adapter weights (the recorded global state of
    round 1 is the server's payload, not the task's init), every update is read by the imprint read-out and
    decoded, and on tiny-mnist the batches come back well above the class prototype. Refusals: CoOp, SecAgg+."""
    from clipleak.errors import ClipleakError
    from clipleak.fl.run import evaluate_run, run_federated
    from clipleak.records import Observation, Reconstruction

    recipe = Recipe(peft=PeftConfig(method="adapter"), weights="tiny-mnist", local_steps=1, batch_size=8, lr=0.1)
    data = ClientData(weights="tiny-mnist", client_size=8, seed=3, truth_dir=str(tmp_path / "truth"))
    spec = RunSpec(out=str(tmp_path / "out"), clients=2, rounds=1, recipe=recipe, attack=None,
                   attack_settings={"decoder": "tiny-mnist-decoder"}, malicious={"groups": 8})
    run_federated(spec, data, engine="inprocess")
    rdir = tmp_path / "out" / "rounds" / "round-001"
    rec = Reconstruction.load(next((rdir / "attacks").glob("node-*")))
    assert rec.attack == "malicious-imprint" and rec.images.shape[0] == 8
    obs = Observation.load(next((rdir / "updates").glob("*.safetensors")))
    honest_init = Server(spec).victim.peft_state()
    assert obs.peft_state and not torch.equal(obs.peft_state["adapter.fc1.weight"], honest_init["adapter.fc1.weight"])
    s = evaluate_run(spec.out, data.truth_dir)["summary"]
    assert s["images"] == 16
    assert s["reid_interval"]["attack"]["value"] >= 0.6 > s["reid_interval"]["prototype"]["value"]
    with pytest.raises(ClipleakError, match="CLIP-Adapter"):
        RunSpec(out=str(tmp_path / "o2"), recipe=Recipe(peft=PeftConfig(method="coop"), weights=None),
                malicious={"groups": 1})
    with pytest.raises(ClipleakError, match="secagg"):
        RunSpec(out=str(tmp_path / "o3"), clients=2, recipe=recipe, malicious={"groups": 1}, secagg={})


@pytest.mark.parametrize("defense", ["prune:0.05", "quantize:sign"])
def test_clients_apply_the_recipes_update_defense_and_the_server_records_it(tmp_path, defense):
    """`fl run --defense`: every client defends its round's update (a pruned update keeps the stated fraction of
    its entries, a sign-quantised one one magnitude per tensor) and the server's observation records it."""
    import math

    from clipleak.errors import ClipleakError

    recipe, _, _, strategy, start, _, _, _ = _one_round(tmp_path, clients=2, local_steps=2, batch_size=1, lr=0.5,
                                                        defense=defense)
    assert recipe.defense == defense and Recipe.from_json(recipe.to_json()).defense == defense
    obs = strategy.observations[1]
    assert len(obs) == 2
    for o in obs:
        assert o.meta["defense"]["spec"] == defense and o.meta["defense"]["kind"] == defense.split(":")[0]
        flat = torch.cat([v.flatten() for v in o.gradients.values()])
        if defense.startswith("prune"):
            assert 0 < int((flat != 0).sum()) <= math.ceil(0.05 * flat.numel())
        else:
            for v in o.gradients.values():  # (new - start) in float32: one magnitude up to rounding, or 0
                mags = v.abs()[v != 0]  # (0 where the gradient was exactly 0: an adapter unit that never fired)
                assert mags.numel() > v.numel() // 4
                assert float(mags.max() - mags.min()) <= 1e-3 * float(mags.max())  # a plain update spreads widely
    with pytest.raises(ClipleakError):
        Recipe(peft=PeftConfig(method="adapter"), defense="prune:2")
