"""The peers x data layout of processes."""

import pytest

from dml.distributed import Mesh
from dml.errors import UserError
from ranks import run_ranks  # the tests folder is on sys.path


def test_replicas_of_a_peer_group_sit_on_neighbouring_ranks():
    mesh = Mesh(world_size=6, data_parallel=2)
    assert mesh.peer_groups == 3
    assert [mesh.position(r) for r in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert mesh.data_dimension(1) == [2, 3]
    assert mesh.peer_dimension(1) == [1, 3, 5]
    # every rank is in exactly one data group and one peer group
    assert sorted(r for g in range(3) for r in mesh.data_dimension(g)) == list(range(6))
    assert sorted(r for d in range(2) for r in mesh.peer_dimension(d)) == list(range(6))


def test_without_data_parallelism_every_process_is_its_own_peer_group():
    mesh = Mesh(world_size=4)
    assert mesh.peer_groups == 4 and mesh.peer_dimension(0) == [0, 1, 2, 3] and mesh.data_dimension(2) == [2]


@pytest.mark.parametrize("world, d", [(4, 3), (6, 4), (2, 0)])
def test_a_data_parallel_size_that_does_not_divide_the_processes_is_refused(world, d):
    with pytest.raises(UserError, match=f"--data-parallel {d} does not divide the {world} processes"):
        Mesh(world, d)


def _exchange_on_a_rank():
    import torch

    from dml.distributed import TorchExchange

    exchange = TorchExchange(2, "cpu", data_parallel=2)
    try:
        (peer,) = exchange.local_indices
        replica = exchange.replica
        logits = exchange.gather_logits([torch.full((2, 3), 10.0 * peer + replica)])
        shared = exchange.share_logits(1, torch.full((2, 3), 7.0 + replica) if peer == 1 else None, logits[0])
        objects = exchange.gather_objects((peer, replica))
        model = torch.nn.Linear(2, 1)
        for q in model.parameters():
            q.grad = torch.full_like(q, float(exchange.rank))
        exchange.average_gradients(model, peer)
        counts = exchange.sum_over_replicas(torch.tensor([replica + 1]))
        return (peer, replica, [z[0, 0].item() for z in logits], shared[0, 0].item(), objects,
                [q.grad.flatten()[0].item() for q in model.parameters()], counts.item(),
                exchange.shard(torch.arange(8)).tolist(), exchange.writes_peers)
    finally:
        exchange.close()


@pytest.mark.processes
def test_logits_travel_between_the_replicas_of_one_shard_and_gradients_between_a_peers_replicas():
    got = run_ranks(4, _exchange_on_a_rank)
    for rank in range(4):
        peer, replica, logits, shared, objects, grads, counts, shard, writes = got[rank]
        assert (peer, replica) == divmod(rank, 2)
        assert logits == [0.0 + replica, 10.0 + replica]  # both peers' logits of this replica's shard
        assert shared == 7.0 + replica  # peer 1's fresh logits, from the replica of the same shard
        assert objects == [(0, replica), (1, replica)]
        first = peer * 2
        assert grads == [(first + first + 1) / 2] * 2  # the mean over the peer's two replicas
        assert counts == 3 and writes == (replica == 0)
        assert shard == list(range(4 * replica, 4 * replica + 4))
