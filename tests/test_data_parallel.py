"""Data-parallel peers on gloo: replicas of each peer, each computing a shard of every batch, against the
same cohort in one process."""

import json
import os
import socket

import pytest
import torch
from torch import nn

import dml
from ranks import run_ranks  # the tests folder is on sys.path

STEPS, B = 4, 16


class Net(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _batches(batch=B):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(batch, 3, 6, 6, generator=g), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(STEPS)]


def _train(num_peers, batch=B, **options):
    """Losses per step and the final parameters and BatchNorm statistics of the local peers."""
    nets = [Net(seed) for seed in range(num_peers)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9) for n in nets]
    losses = []
    with dml.Cohort(nets, opts, device="cpu", precision="fp32", plain=True, **options) as cohort:
        for x, y in _batches(batch):
            out = cohort.step(x, y)
            losses.append([loss.item() for loss in out.losses])
        local = [p.index for p in cohort.peers]
        states = {p.index: {k: v.clone() for k, v in p.model.state_dict().items()} for p in cohort.peers}
    return local, losses, states


def _replica(num_peers, batch=B):
    local, losses, states = _train(num_peers, batch, data_parallel=2)
    return local, losses, {i: {k: v.numpy() for k, v in st.items()} for i, st in states.items()}


def _spread(world, num_peers):
    return run_ranks(world, _replica, num_peers)


@pytest.mark.processes
@pytest.mark.parametrize("num_peers", [1, 2])
def test_replicas_compute_what_one_process_computes(num_peers):
    _, single_losses, single_states = _train(num_peers)
    got = _spread(2 * num_peers, num_peers)
    worst = 0.0
    for rank, (local, losses, states) in got.items():
        for peer in local:
            # a replica's loss is its shard's; the mean over a peer's two replicas is the whole batch's
            partner = got[rank ^ 1][1]
            k = local.index(peer)
            for step in range(STEPS):
                mean = (losses[step][k] + partner[step][k]) / 2
                worst = max(worst, abs(mean - single_losses[step][peer]))
            for key, value in states[peer].items():
                value = torch.from_numpy(value)
                if value.is_floating_point():
                    worst = max(worst, (value - single_states[peer][key]).abs().max().item())
                else:
                    assert torch.equal(value, single_states[peer][key]), key
    print(f"largest difference from one process: {worst:.2e}")
    assert worst < 1e-5


@pytest.mark.processes
def test_a_batch_the_replicas_do_not_divide_weighs_each_shard_by_its_rows():
    """A batch of 15 over 2 replicas (7 and 8 rows): the replicas end where one process ends, their losses
    weighted by their rows giving the whole batch's (equal weights would step on a different mean)."""
    _, single_losses, single_states = _train(2, 15)
    got = run_ranks(4, _replica, 2, 15)
    worst = 0.0
    for rank, (local, losses, states) in got.items():
        rows = 7 if rank % 2 == 0 else 8
        partner = got[rank ^ 1][1]
        for k, peer in enumerate(local):
            for step in range(STEPS):
                whole = (rows * losses[step][k] + (15 - rows) * partner[step][k]) / 15
                worst = max(worst, abs(whole - single_losses[step][peer]))
            for key, value in states[peer].items():
                if value.dtype.kind == "f":
                    worst = max(worst, (torch.from_numpy(value) - single_states[peer][key]).abs().max().item())
    print(f"largest difference from one process: {worst:.2e}")
    assert worst < 1e-5


def _outputs(rank, steps=3, rows=4):
    """Made-up step outputs of one peer on replica ``rank``: (loss, ce, kd, logits, labels) per step."""
    g = torch.Generator().manual_seed(10 + rank)
    return [(torch.rand((), generator=g) * 3, torch.rand((), generator=g), torch.rand((), generator=g),
             torch.randn(rows, 5, generator=g), torch.randint(0, 5, (rows,), generator=g)) for _ in range(steps)]


def _read_metrics():
    from dml.cohort import StepOutput
    from dml.distributed import make_exchange
    from dml.engine import StepMetrics

    exchange = make_exchange(1, "cpu", None, data_parallel=2)
    try:
        metrics = StepMetrics(1, torch.device("cpu"))
        for loss, ce, kd, logits, labels in _outputs(exchange.replica):
            metrics.add(StepOutput([loss], [logits], [ce], [kd]), labels)
        return metrics.read(exchange)
    finally:
        exchange.close()


@pytest.mark.processes
def test_an_epochs_train_numbers_are_the_plain_means_over_steps_and_replicas():
    """What an epoch logs (loss and its terms, accuracy) from two replicas' steps: each the plain mean of every
    step of both replicas, accuracy over both replicas' rows."""
    got = run_ranks(2, _read_metrics)
    both = _outputs(0) + _outputs(1)
    expected = {"loss": sum(s[0].item() for s in both) / 6, "ce": sum(s[1].item() for s in both) / 6,
                "kd": sum(s[2].item() for s in both) / 6,
                "acc": 100 * sum((s[3].argmax(1) == s[4]).sum().item() for s in both) / 24}
    for rank in (0, 1):
        for key, value in expected.items():
            assert got[rank][key] == [pytest.approx(value, rel=1e-12)], (rank, key)


def _one_step_local_batchnorm(local):
    """One step of one Net over 2 replicas: its BatchNorm's type and running mean, and the running mean its
    own shard's statistics give (momentum 0.1 from 0)."""
    net = Net(0)
    x, y = _batches()[0]
    with dml.Cohort([net], [torch.optim.SGD(net.parameters(), lr=0.1)], device="cpu", precision="fp32", plain=True,
                    threads=1, data_parallel=2, local_batchnorm=local) as cohort:
        rows = slice(cohort.exchange.replica * B // 2, (cohort.exchange.replica + 1) * B // 2)
        with torch.no_grad():
            own = 0.1 * net.conv(x[rows]).mean((0, 2, 3))
            whole = 0.1 * net.conv(x).mean((0, 2, 3))
        cohort.step(x, y)
        return type(net.bn).__name__, net.bn.running_mean.numpy(), own.numpy(), whole.numpy()


@pytest.mark.processes
@pytest.mark.parametrize("local", [True, False])
def test_local_batchnorm_keeps_each_replicas_statistics_to_its_own_shard(local):
    for kind, running, own, whole in run_ranks(2, _one_step_local_batchnorm, local).values():
        assert kind == ("BatchNorm2d" if local else "SyncedBatchNorm")
        torch.testing.assert_close(torch.from_numpy(running), torch.from_numpy(own if local else whole))
        assert not torch.allclose(torch.from_numpy(own), torch.from_numpy(whole))  # the two are told apart


def _train_trunk(teacher, data_parallel=1):
    """Losses per step and the final state of a trunk's 2 ResNet-20 branches (ONE's gate; or PCL's fusion with a
    view of the batch per branch, and temporal means of both branches) trained with default DML links."""
    from dml.branches import Branches
    from dml.models import create_model

    torch.manual_seed(0)
    views = teacher == "pcl"
    # float64: in fp32 one ReLU input within 2e-7 of 0 changed sign between 1 and 2 processes at the third step
    # and the gradients differed by 1e-2 (a real discontinuity, not an error of the replicas); in float64 what
    # is left is the fp32 in which processes exchange logits (1e-8)
    network = Branches([create_model("resnet20", 5) for _ in range(2)], teacher=teacher, views=views).double()
    models = [network] + [None, None] * views
    optimizers = [torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)] + [dml.MeanOf(0), dml.MeanOf(1)] * views
    loss = dml.Links.mutual(3 + 2 * views, frozen=[3, 4] if views else [])
    g = torch.Generator().manual_seed(3)
    losses = []
    with dml.Cohort(models, optimizers, loss, device="cpu", precision="fp32", plain=True, threads=1,
                    data_parallel=data_parallel) as cohort:
        for _ in range(3):
            x = torch.randn(*[2] * views, B, 3, 8, 8, generator=g, dtype=torch.float64)
            out = cohort.step(x, torch.randint(0, 5, (B,), generator=g))
            losses.append([loss.item() for loss in out.losses])
        state = {k: v.clone().numpy() for k, v in network.state_dict().items()}
        state.update({f"mean{p.index}.{k}": v.clone().numpy() for p in cohort.peers if p.mean_of is not None
                      for k, v in p.model.state_dict().items()})
    return losses, state


@pytest.mark.processes
@pytest.mark.parametrize("teacher", ["one", "pcl"])
def test_a_trunk_over_2_replicas_computes_what_one_process_computes(teacher):
    """The whole multi-branch network's gradients are averaged over the replicas and its BatchNorm statistics
    (the trunk's shared layers once) span the whole batch; views of a batch are split along the batch."""
    single_losses, single_state = _train_trunk(teacher)
    got = run_ranks(2, _train_trunk, teacher, 2)
    for step in range(3):
        for peer in range(len(single_losses[0])):
            mean = (got[0][0][step][peer] + got[1][0][step][peer]) / 2  # each replica's loss is its shard's
            assert abs(mean - single_losses[step][peer]) < 1e-6, (step, peer)
    assert single_state.keys() == got[0][1].keys() == got[1][1].keys()
    worst = max(abs(torch.from_numpy(got[r][1][k]).double() - torch.from_numpy(v).double()).max().item()
                for r in (0, 1) for k, v in single_state.items())
    print(f"largest difference from one process: {worst:.2e}")
    assert worst < 1e-6


def _train_with_means(data_parallel=1, own_networks=False):
    """Losses per step and final states of 2 peers and their temporal means (PCL-style, separate networks,
    side by side on threads), each peer learning from the other's mean; ``own_networks``: the means are
    given networks of their own (they start from their sources' weights) instead of copies."""
    nets = [Net(seed) for seed in range(2)] + ([Net(7), Net(8)] if own_networks else [None, None])
    optimizers = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9) for n in nets[:2]]
    loss = dml.Links([dml.Link(3, 0, temperature=2.0), dml.Link(2, 1, temperature=2.0)], 4, frozen=[2, 3])
    losses = []
    with dml.Cohort(nets, optimizers + [dml.MeanOf(0), dml.MeanOf(1)], loss, device="cpu", precision="fp32",
                    plain=True, threads=1, data_parallel=data_parallel) as cohort:
        for x, y in _batches():
            losses.append([loss.item() for loss in cohort.step(x, y).losses])
        states = {f"{p.index}.{k}": v.clone().numpy() for p in cohort.peers for k, v in p.model.state_dict().items()}
    return losses, states


@pytest.mark.processes
@pytest.mark.parametrize("own_networks", [False, True])
def test_temporal_means_over_2_replicas_keep_the_statistics_one_process_keeps(own_networks):
    """A mean computes in training mode: over replicas its BatchNorm statistics span the whole batch through
    a group of its own (its source computes beside it, on another thread, with another group)."""
    single_losses, single_state = _train_with_means(1, own_networks)
    got = run_ranks(2, _train_with_means, 2, own_networks)
    for step in range(STEPS):
        for peer in range(4):
            mean = (got[0][0][step][peer] + got[1][0][step][peer]) / 2  # each replica's loss is its shard's
            assert abs(mean - single_losses[step][peer]) < 1e-5, (step, peer)
    assert single_state.keys() == got[0][1].keys() == got[1][1].keys()
    for k, v in single_state.items():
        for r in (0, 1):
            torch.testing.assert_close(torch.from_numpy(got[r][1][k]), torch.from_numpy(v), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(torch.from_numpy(single_state["2.bn.running_mean"]),
                              torch.from_numpy(single_state["0.bn.running_mean"]))  # the mean's own


BN_NET = """
import torch
from torch import nn


def small(num_classes):
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
"""


def _dml_train(cifar_root, out, *args):
    """2 peers of a small network with BatchNorm (its training is well conditioned: rounding differences
    stay rounding differences, where the ResNets' confident start amplifies them chaotically)."""
    import subprocess

    from tiny_run import tiny_flags, train_command

    (out.parent / "bn_net.py").write_text(BN_NET)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DML_MEASURE_THREADS": "0", "PYTHONPATH": os.pathsep.join(
        [str(out.parent), os.environ.get("PYTHONPATH", "")])}
    command = train_command(cifar_root, out, "--models", "bn_net:small", "--num-nodes", "2", "--epochs", "2",
                            "--plain", "--precision", "fp32", *args, tiny=tiny_flags(train=128))
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=out.parent)


@pytest.mark.processes
def test_a_run_over_2_peers_x_2_replicas_ends_where_one_process_ends(cifar_root, tmp_path):
    from tiny_run import metrics

    one = _dml_train(cifar_root, tmp_path / "one")
    assert one.returncode == 0, one.stderr
    four = _dml_train(cifar_root, tmp_path / "four", "--procs", "4", "--data-parallel", "2")
    assert four.returncode == 0, four.stderr
    a, b = (metrics(tmp_path / kind / "dml_n2_bn_net-small_s42") for kind in ("one", "four"))
    assert [(r["epoch"], r["node"]) for r in a] == [(r["epoch"], r["node"]) for r in b]
    worst = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("train_loss", "train_ce", "train_kd")
                if k in x)
    print(f"largest difference of a loss in metrics.jsonl: {worst:.2e}")
    assert worst < 1e-5
    assert [r["test_acc"] for r in a] == [r["test_acc"] for r in b]


@pytest.mark.processes
def test_a_trunk_graph_over_2_replicas_ends_near_one_process_and_its_branches_load_alone(cifar_root, tmp_path):
    """ONE's graph file through `dml train --procs 2 --data-parallel 2`: the engine builds the trunk in each
    replica, the run's metrics follow one process's (fp32 ResNets drift at rounding level, see _train_trunk),
    and replica 0 writes each branch's best.pt, a standalone network."""
    import subprocess
    from pathlib import Path

    from dml.evaluate import load_model
    from tiny_run import metrics, tiny_flags, train_command

    graph = tmp_path / "one.toml"
    graph.write_text((Path(__file__).resolve().parents[1] / "examples/graphs/one.toml").read_text()
                     .replace("resnet32", "resnet20"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DML_MEASURE_THREADS": "0"}
    runs = {}
    for kind, extra in (("one", []), ("two", ["--procs", "2", "--data-parallel", "2"])):
        command = train_command(cifar_root, tmp_path / kind, "--graph", str(graph), "--epochs", "1", "--plain",
                                "--precision", "fp32", *extra, tiny=tiny_flags(train=64, test=50))
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[kind] = metrics(tmp_path / kind / "graph-one_resnet20_s42")
    assert [r["node"] for r in runs["one"]] == [r["node"] for r in runs["two"]] == [0, 1, 2, 3, "ensemble"]
    worst = max(abs(a["train_loss"] - b["train_loss"]) / a["train_loss"] for a, b in zip(runs["one"], runs["two"])
                if "train_loss" in a)
    print(f"largest relative difference of a train loss: {worst:.1e}")  # 6.5e-08 when written
    assert worst < 1e-5
    branch = load_model(tmp_path / "two" / "graph-one_resnet20_s42" / "1_resnet20" / "best.pt", torch.device("cpu"))
    assert type(branch.model).__name__ == "CifarResNet"


@pytest.mark.processes
def test_two_torchrun_nodes_on_one_machine_run_as_two_machines_would(cifar_root, tmp_path):
    """Two torchrun "nodes" (--nnodes 2, a c10d rendezvous on 127.0.0.1), 2 processes each: 2 peers x 2
    replicas, the replicas of each peer on one node; the metrics of one process."""
    import subprocess
    import sys

    from tiny_run import metrics, tiny_flags, train_argv

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "bn_net.py").write_text(BN_NET)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DML_MEASURE_THREADS": "0",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    argv = train_argv(cifar_root, tmp_path / "nodes", "--models", "bn_net:small", "--num-nodes", "2", "--epochs", "2",
                      "--plain", "--precision", "fp32", "--data-parallel", "2", tiny=tiny_flags(train=128))
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"127.0.0.1:{port}", "--rdzv-id", "dml-test", "-m", "dml", *argv],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes:
        out, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-2000:]
    one = _dml_train(cifar_root, tmp_path / "one")
    assert one.returncode == 0, one.stderr
    a, b = (metrics(tmp_path / kind / "dml_n2_bn_net-small_s42") for kind in ("one", "nodes"))
    assert [(r["epoch"], r["node"]) for r in a] == [(r["epoch"], r["node"]) for r in b]
    assert max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("train_loss", "train_kd") if k in x) < 1e-5


@pytest.mark.parametrize("args, message", [
    (["--data-parallel", "2"], "--data-parallel 2 needs 2 or more processes: start them with --procs or torchrun"),
    (["--data-parallel", "2", "--procs", "3"], "--procs 3 is not a multiple of --data-parallel 2"),
    (["--data-parallel", "2", "--procs", "6"], "--procs must be between 1 and --num-nodes (2) times --data-parallel"),
    (["--data-parallel", "3"], "--data-parallel 3 does not divide --batch-size 32"),
    (["--data-parallel", "64", "--batch-size", "32"], "--data-parallel 64 exceeds --batch-size 32"),
    (["--local-batchnorm"], "--local-batchnorm applies to --data-parallel replicas"),
    (["--data-parallel", "0"], "--data-parallel must be a positive integer"),
])
def test_each_mistake_in_a_data_parallel_layout_is_one_error_line(cifar_root, tmp_path, capsys, args, message):
    from dml.cli import main
    from tiny_run import tiny_flags, train_argv

    argv = train_argv(cifar_root, tmp_path / "runs", "--models", "resnet20", "--num-nodes", "2", *args,
                      tiny=tiny_flags())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.pt"))


def test_plans_refuse_data_parallel_runs_in_one_line(cifar_root, tmp_path):
    from dml.errors import UserError
    from dml.plan import read_plan

    plan = tmp_path / "plan.toml"
    plan.write_text('[defaults]\nmodels = ["resnet20"]\nnum_nodes = 2\ndata_parallel = 2\n')
    with pytest.raises(UserError, match="data_parallel needs several processes per run, which plans do not start"):
        read_plan(plan, tmp_path / "out")


@pytest.mark.processes
def test_kill_9_of_a_replica_then_resume_and_checkpoints_across_layouts(cifar_root, tmp_path, monkeypatch, capsys):
    """2 peers x 2 replicas: a process killed in epoch 2, then the same command with --resume, ends with the
    uninterrupted run's metrics and weights; a run of that layout stopped after epoch 1 and resumed in one
    process ends within rounding of it too (checkpoints are the files one process writes)."""
    import signal
    import subprocess
    import time

    from test_distributed import _children
    from tiny_run import metrics, tiny_flags, train_command

    (tmp_path / "bn_net.py").write_text(BN_NET)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DML_MEASURE_THREADS": "0",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    mesh = ["--procs", "4", "--data-parallel", "2"]

    def command(out, *args):
        return train_command(cifar_root, tmp_path / out, "--models", "bn_net:small", "--num-nodes", "2", "--epochs",
                             "3", "--plain", "--precision", "fp32", *args, tiny=tiny_flags(train=1024))

    def run(out, *args):
        done = subprocess.run(command(out, *args), capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
        return tmp_path / out / "dml_n2_bn_net-small_s42"

    straight = run("straight", *mesh)
    killed = subprocess.Popen(command("killed", *mesh), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=tmp_path)
    log = tmp_path / "killed" / "dml_n2_bn_net-small_s42" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (log.exists() and log.read_text().count("\n") >= 3):  # epoch 1 is complete
        assert killed.poll() is None and time.monotonic() < deadline, "the run never finished epoch 1"
        time.sleep(0.1)
    workers = _children(killed.pid)
    assert len(workers) == 4, workers
    os.kill(workers[1], signal.SIGKILL)  # the second replica of peer 0
    _, err = killed.communicate(timeout=120)
    assert killed.returncode != 0 and "--resume" in err
    resumed = run("killed", *mesh, "--resume")
    assert metrics(resumed) == metrics(straight)
    for peer in ("0_bn_net-small", "1_bn_net-small"):
        a, b = (torch.load(run_dir / peer / "last.pt", weights_only=True)["model"] for run_dir in (straight, resumed))
        assert all(torch.equal(a[key], b[key]) for key in a)

    run("moved", *mesh, "--stop-after", "1")
    moved = run("moved", "--resume")  # one process continues the 4-process run
    a, b = metrics(straight), metrics(moved)
    assert [(r["epoch"], r["node"]) for r in a] == [(r["epoch"], r["node"]) for r in b]
    assert max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("train_loss", "train_kd") if k in x) < 1e-5
    from dml.cli import main

    monkeypatch.syspath_prepend(str(tmp_path))  # bn_net, in this process too
    best = straight / "0_bn_net-small" / "best.pt"  # written by one replica; evaluated in one process
    assert main(["evaluate", str(best), "--models", "bn_net:small", "--test-samples", "100", "--json",
                 str(tmp_path / "eval.json")]) == 0, capsys.readouterr().err
    logged = max(r["test_acc"] for r in metrics(straight) if r["node"] == 0)
    assert json.loads((tmp_path / "eval.json").read_text())["checkpoints"][0]["top1"] == logged


def test_the_slurm_example_is_valid_bash_and_starts_torchrun_on_every_node():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "slurm" / "dml_train.sbatch"
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    text = script.read_text()
    assert "#SBATCH --requeue" in text and "srun" in text and "--rdzv-backend c10d" in text
    assert "--data-parallel" in text and "--max-restarts 3" in text
    assert text.rstrip().endswith("--resume auto")  # one command for the first start, restarts and requeues
    from dml.models import MODEL_NAMES

    models = text.split("--models ", 1)[1].split()[0]
    assert models in MODEL_NAMES and "--data-loader stream" in text  # built-in names; each process its own rows
