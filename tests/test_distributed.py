"""Data-parallel SVI through Lightning: 2 CPU processes (gloo) against one process.

A second launch starts two one-process "nodes" with torchrun (``--nnodes 2``) on this host.

Launched the way a multi-node job is (Lightning's environment variables: MASTER_ADDR,
MASTER_PORT, WORLD_SIZE, NODE_RANK, LOCAL_RANK), two worker processes each call
``ppl_vae.fit(..., devices=2, strategy="ddp", device="cpu")``. Skips without ``lightning``.
The whole file takes about 20 s of CPU time (two worker start-ups importing torch, Pyro and
Lightning dominate): ~35 s wall on an idle 2-core machine, up to ~110 s when it is
oversubscribed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

import ppl_vae  # noqa: E402

# Two pairs, shared by the worker processes and the single-process reference run.
#  * regression: a global latent mu with a point-mass (Delta) guide, a positive pyro.param
#    outside any module and an nn.Linear registered with pyro.module: the loss is a
#    deterministic function of the batch, so 2 ranks x 8 rows must follow the single-process
#    run with batches of 16 exactly (up to float summation order).
#  * a tiny VAE (stochastic): it must train, stay identical across ranks and reach an ELBO
#    close to the single-process run's.
PAIRS = textwrap.dedent('''
    import pyro, pyro.distributions as dist, torch
    from pyro.distributions import constraints
    from torch import nn
    from ppl_vae.models.vae import build_vae

    class Regression(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 1)

        def forward(self, x, y, size=None, subsample=None):
            pyro.module("regression", self)
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            sigma = pyro.param("sigma", torch.tensor(2.0), constraint=constraints.positive)
            with pyro.plate("data", size or len(x), subsample=subsample):
                pyro.sample("y", dist.Normal(mu + self.linear(x).squeeze(-1), sigma), obs=y)

    def regression_guide(x, y, size=None, subsample=None):
        pyro.sample("mu", dist.Delta(pyro.param("mu_loc", torch.tensor(0.5))))

    def regression_data():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 3, generator=g)
        y = 1.5 + x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(64, generator=g)
        return x, y

    def regression_loader():
        """Global batch 16, not shuffled: rank r reads rows r, r+2, ... (DistributedSampler),
        so each step covers the same 16 rows as one process reading this loader."""
        from torch.utils.data import DataLoader, TensorDataset
        return DataLoader(TensorDataset(*regression_data()), batch_size=16, shuffle=False)

    def vae_data():
        g = torch.Generator().manual_seed(2)
        proto = (torch.rand(4, 6, 6, generator=g) > 0.5).float()
        return proto[torch.arange(96) % 4]

    REG = dict(epochs=3, batch_size=16, lr=0.05, seed=3, device="cpu", progress=False)
    VAE = dict(epochs=6, batch_size=32, lr=0.01, seed=4, device="cpu", progress=False)

    def regression_params(model):
        store = pyro.get_param_store()
        return {"mu_loc": store["mu_loc"].detach().clone(),
                "sigma": store["sigma"].detach().clone(),
                **{k: v.detach().clone() for k, v in model.state_dict().items()}}
''')

WORKER = PAIRS + textwrap.dedent('''
    import os, sys
    import ppl_vae
    out = sys.argv[1]
    rank = int(os.environ["LOCAL_RANK"])
    torch.manual_seed(0)
    reg = Regression()
    h1 = ppl_vae.fit(reg, regression_guide, regression_data(), devices=2, strategy="ddp",
                     **REG)
    reg_params = regression_params(reg)  # before the next fit clears the param store
    # the same pair fed by a DataLoader (re-made per rank with a DistributedSampler)
    torch.manual_seed(0)
    reg_loader = Regression()
    ppl_vae.fit(reg_loader, regression_guide, regression_loader(), devices=2,
                strategy="ddp", **REG)
    loader_params = regression_params(reg_loader)
    vae, guide = build_vae(latent_dim=2, hidden=(16,), image_shape=(6, 6))
    h2 = ppl_vae.fit(vae, guide, vae_data(), val_data=vae_data()[:20], devices=2,
                     strategy="ddp", out=os.path.join(out, "vae_run"), **VAE)
    torch.save({"regression": reg_params, "regression_loader": loader_params,
                "vae": {k: v.detach().clone() for k, v in
                        {**vae.state_dict(), **guide.state_dict()}.items()},
                "history_regression": h1.rows, "history_vae": h2.rows},
               os.path.join(out, f"rank{rank}.pt"))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(procs: list[subprocess.Popen], what: str, timeout: int = 150) -> None:
    """Wait for every process; fail with the log of the first that failed or timed out."""
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{what} did not finish in {timeout} s")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Run the worker on 2 processes; return {rank: saved results} plus the run folder."""
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
                   NODE_RANK="0", LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen([sys.executable, str(script), str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    _wait(procs, "distributed workers")
    return {"out": out, **{r: torch.load(out / f"rank{r}.pt", weights_only=True)
                           for r in range(2)}}


NODE_WORKER = PAIRS + textwrap.dedent('''
    import os, sys
    import ppl_vae
    torch.manual_seed(0)
    reg = Regression()
    ppl_vae.fit(reg, regression_guide, regression_data(), devices=1, num_nodes=2,
                strategy="ddp", **REG)
    torch.save(regression_params(reg),
               os.path.join(sys.argv[1], f"node{os.environ['GROUP_RANK']}.pt"))
''')


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> dict:
    """Two "nodes" on this host, one process each, started the way a multi-node job is:
    ``torchrun --nnodes 2 --node-rank i --nproc-per-node 1 --master-addr ... worker.py``."""
    out = tmp_path_factory.mktemp("nodes")
    script = out / "node_worker.py"
    script.write_text(NODE_WORKER)
    port = str(_free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
         str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
         port, str(script), str(out)], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for node in range(2)]
    _wait(procs, "torchrun nodes")
    return {node: torch.load(out / f"node{node}.pt", weights_only=True) for node in range(2)}


def _namespace() -> dict:
    ns: dict = {}
    exec(PAIRS, ns)
    return ns


def test_ranks_hold_identical_parameters(two_ranks):
    for key in ("regression", "vae"):
        a, b = two_ranks[0][key], two_ranks[1][key]
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{key}.{name} differs between ranks"
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(two_ranks[0]["history_vae"]) == drop(two_ranks[1]["history_vae"])


def test_matches_single_process_with_same_global_batch(two_ranks):
    """Deterministic loss: 2 ranks x 8 rows == 1 process x 16 rows, parameters within
    1e-4 (absolute) after 12 Adam steps; they moved far more than that from the start."""
    ns = _namespace()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reg = ns["Regression"]()
    history = ppl_vae.fit(reg, ns["regression_guide"], ns["regression_data"](), **ns["REG"])
    single = ns["regression_params"](reg)
    ddp = two_ranks[0]["regression"]
    assert abs(float(single["mu_loc"]) - 0.5) > 0.05  # it trained
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, atol=1e-4, rtol=1e-4,
                                   msg=f"{name}: {ddp[name]} (2 ranks) vs {value} (1 process)")
    # the recorded training ELBO (mean of the ranks' estimates) is the same figure too
    for a, b in zip(history.rows, two_ranks[0]["history_regression"]):
        assert abs(a["train_elbo"] - b["train_elbo"]) < 1e-3 * (1 + abs(a["train_elbo"]))


def test_dataloader_is_sharded_like_in_memory_data(two_ranks):
    """A DataLoader (global batch 16) on 2 ranks follows one process reading the same
    loader, within 1e-4: each rank got its half of every global batch."""
    ns = _namespace()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reg = ns["Regression"]()
    ppl_vae.fit(reg, ns["regression_guide"], ns["regression_loader"](), **ns["REG"])
    single = ns["regression_params"](reg)
    ddp = two_ranks[0]["regression_loader"]
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, atol=1e-4, rtol=1e-4)
        assert torch.equal(ddp[name], two_ranks[1]["regression_loader"][name])


def test_two_nodes_under_torchrun_match_one_node(two_nodes, two_ranks):
    """num_nodes=2 x devices=1 (torchrun, static rendezvous) trains the same parameters as
    devices=2 on one node: the same 2 ranks, the same shards."""
    for name, value in two_ranks[0]["regression"].items():
        assert torch.equal(two_nodes[0][name], two_nodes[1][name]), name
        torch.testing.assert_close(two_nodes[0][name], value, atol=1e-6, rtol=1e-6)


def test_vae_trains_and_run_folder_restores(two_ranks):
    ns = _namespace()
    rows = two_ranks[0]["history_vae"]
    assert len(rows) == 6
    assert rows[-1]["train_elbo"] > rows[0]["train_elbo"] + 1.0  # loss falls
    assert "val_elbo" in rows[-1]
    torch.manual_seed(0)
    vae, guide = ns["build_vae"](latent_dim=2, hidden=(16,), image_shape=(6, 6))
    data = ns["vae_data"]()
    ppl_vae.restore(vae, guide, two_ranks["out"] / "vae_run" / "checkpoint.pt", data[:8])
    restored = {**vae.state_dict(), **guide.state_dict()}
    for name, value in two_ranks[0]["vae"].items():
        assert torch.equal(restored[name], value), name
    # stochastic model: same global batch in one process reaches a similar ELBO
    vae1, guide1 = ns["build_vae"](latent_dim=2, hidden=(16,), image_shape=(6, 6))
    single = ppl_vae.fit(vae1, guide1, data, **ns["VAE"])
    assert abs(single.rows[-1]["train_elbo"] - rows[-1]["train_elbo"]) < 3.0, (
        single.rows[-1]["train_elbo"], rows[-1]["train_elbo"])
    assert (Path(two_ranks["out"]) / "vae_run" / "metrics.csv").exists()


def test_bad_settings_fail_before_training():
    x = torch.randn(10, 3)
    ns = _namespace()
    reg = ns["Regression"]()
    with pytest.raises(ValueError, match="devices must be >= 1"):
        ppl_vae.fit(reg, ns["regression_guide"], (x, x[:, 0]), devices=0, device="cpu")
    with pytest.raises(ValueError, match="strategy='ddp_spawn'"):
        ppl_vae.fit(reg, ns["regression_guide"], (x, x[:, 0]), devices=2,
                    strategy="ddp_spawn", device="cpu")
    from torch.utils.data import DataLoader, IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(x, x[:, 0])

    with pytest.raises(ValueError, match="got DataLoader .*iterable dataset cannot be sharded"):
        ppl_vae.fit(reg, ns["regression_guide"], DataLoader(Stream(), batch_size=4),
                    devices=2, device="cpu")
    bad = x.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"data\[0\] contains NaN .* index \[4, 1\]"):
        ppl_vae.fit(reg, ns["regression_guide"], (bad, x[:, 0]), devices=2, device="cpu")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, 0]),
                                         batch_size=5)
    with pytest.raises(ValueError, match="batch_size 5 is the global batch .* over 2 ranks"):
        ppl_vae.fit(reg, ns["regression_guide"], loader, devices=2, device="cpu")
    with pytest.raises(ValueError, match="batch_size 5 .* over 4 ranks"):
        ppl_vae.fit(reg, ns["regression_guide"], loader, devices=2, num_nodes=2, device="cpu")


def test_rank_shards_partition_the_single_process_batches():
    """Same seed: at every step the ranks' rows together are exactly the single-process
    minibatch, no row twice; every rank reports the full dataset size."""
    from ppl_vae.batching import TensorBatches
    from ppl_vae.distributed import ShardedBatches

    x = torch.arange(50.0)[:, None]
    single = TensorBatches(x, 12, shuffle=True)
    single.generator.manual_seed(7)
    ranks = [ShardedBatches(x, 12, rank=r, world_size=3) for r in range(3)]
    for r in ranks:
        r.generator.manual_seed(7)
    for _ in range(2):  # two epochs: the permutations stay in step
        steps = list(zip(single, *ranks))
        assert len(steps) == 5
        for whole, *parts in steps[:-1]:
            rows = torch.cat([p.subsample for p in parts])
            assert sorted(rows.tolist()) == sorted(whole.subsample.tolist())
            assert all(p.size == 50 and len(p) == 4 for p in parts)
        last = torch.cat([p.subsample for p in steps[-1][1:]])  # 2 rows left, 3 ranks
        assert set(last.tolist()) >= set(steps[-1][0].subsample.tolist())
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        ShardedBatches(x, 3, rank=0, world_size=4)


def test_cli_flags_reach_fit():
    from ppl_vae.cli.main import build_parser, fit_overrides

    parser = build_parser()
    args = parser.parse_args(["train", "vae", "--out", "run", "--devices", "2",
                              "--num-nodes", "3", "--strategy", "ddp"])
    options = fit_overrides(args)
    assert (options["devices"], options["num_nodes"], options["strategy"]) == (2, 3, "ddp")
    args = parser.parse_args(["train", "vae", "--out", "run", "--devices", "0,1"])
    assert fit_overrides(args)["devices"] == [0, 1]
    assert "devices" not in fit_overrides(parser.parse_args(["train", "vae", "--out", "run"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "vae", "--out", "run", "--devices", "two"])


def test_batchnorm_is_synchronised_on_gpus_only():
    """ProdLDA's BatchNorm layers become SyncBatchNorm under DDP on GPUs (global-batch
    statistics); PyTorch has no CPU SyncBatchNorm, and models without BatchNorm are left as
    they are."""
    from ppl_vae.distributed import wants_sync_batchnorm
    from ppl_vae.models.prodlda import build_prodlda
    from ppl_vae.models.vae import build_vae

    topics = list(build_prodlda(vocab_size=30, num_topics=3, hidden=8))
    assert wants_sync_batchnorm(topics, "gpu")
    assert not wants_sync_batchnorm(topics, "cpu")
    assert not wants_sync_batchnorm(list(build_vae(latent_dim=2, hidden=(8,))), "gpu")


def test_the_cli_trains_a_run_folder_on_two_processes(tmp_path):
    """`ppl-vae train ... --devices 2` (the README's CPU example): Lightning starts rank 1 by
    re-running the command, which took the run folder's lock of rank 0 and failed. Rank 0
    alone now holds the lock and writes the folder; the run reloads."""
    import shutil

    exe = shutil.which("ppl-vae")
    if exe is None:
        pytest.skip("the ppl-vae command is not on PATH")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [exe, "train", "irt-2pl", "--responses", "lsat6", "--method", "amortized",
         "--epochs", "2", "--devices", "2", "--device", "cpu", "--out", str(out),
         "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    _wait([proc], "ppl-vae train --devices 2")
    run = ppl_vae.load_run(out)
    assert len(run.history) == 2 and (out / "items.csv").exists()
    assert not (out / ".lock").exists()


def test_resuming_a_finished_run_on_two_processes_loads_it_and_per_row_val_data_is_refused(
        tmp_path):
    """fit(devices=2, resume=True) on a run already trained to its epochs returned the
    untrained model (sigma 1.0 against the run's 0.95) and, for fewer epochs, no error; an
    early-stopped run trained one more epoch. Both now do what the single-process fit does,
    in the calling process (no workers start). val_data beside per-row autoguide parameters
    crashed after the first epoch on two processes; it is refused before any starts."""
    import pyro
    import pyro.distributions as dist
    from pyro.infer.autoguide import AutoNormal

    from ppl_vae import SetupError, fit

    torch.manual_seed(0)
    x = torch.randn(64) + 1.0

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    guide = AutoNormal(model)
    fit(model, guide, x, epochs=3, batch_size=16, lr=0.05, out=tmp_path / "run",
        progress=False, device="cpu")
    trained = guide.locs.mu.item()
    pyro.clear_param_store()
    resumed = AutoNormal(model)
    history = fit(model, resumed, x, epochs=3, batch_size=16, lr=0.05, out=tmp_path / "run",
                  resume=True, devices=2, progress=False, device="cpu")
    assert resumed.locs.mu.item() == pytest.approx(trained, abs=1e-6)
    assert len(history) == 3
    with pytest.raises(SetupError, match="trained 3 epochs already"):
        fit(model, AutoNormal(model), x, epochs=2, batch_size=16, lr=0.05,
            out=tmp_path / "run", resume=True, devices=2, progress=False, device="cpu")

    def per_row(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(SetupError, match=r"one parameter per training row for z"):
        fit(per_row, AutoNormal(per_row), x, val_data=x[:8], epochs=1, devices=2,
            progress=False, device="cpu")
