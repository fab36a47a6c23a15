"""The peers x data layout of processes."""

import pytest

from dml.distributed import Mesh
from dml.errors import UserError


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
