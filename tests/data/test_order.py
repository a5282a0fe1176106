import numpy as np

from observatory.data import batch_indices, data_order_fingerprint


def test_data_order_is_a_pure_function_visiting_each_sequence_once_per_epoch():
    n, batch = 50, 8
    steps = range(0, 2 * n // batch + 3)
    order = np.concatenate(
        [batch_indices(data_seed=3, step=s, batch_size=batch, dataset_size=n) for s in steps]
    )
    assert sorted(order[:n]) == list(range(n))  # epoch 0
    assert sorted(order[n : 2 * n]) == list(range(n))  # epoch 1, a different permutation
    assert not np.array_equal(order[:n], order[n : 2 * n])
    again = batch_indices(data_seed=3, step=7, batch_size=batch, dataset_size=n)
    assert np.array_equal(again, order[7 * batch : 8 * batch])
    wide = batch_indices(data_seed=3, step=0, batch_size=3 * n, dataset_size=n)  # 3 epochs
    assert np.array_equal(wide[: len(order)], order)  # the same order, however it is batched
    assert sorted(wide[2 * n :]) == list(range(n))
    other = batch_indices(data_seed=4, step=0, batch_size=batch, dataset_size=n)
    assert not np.array_equal(other, order[:batch])
    assert data_order_fingerprint(data_seed=3, dataset_size=n) != data_order_fingerprint(
        data_seed=4, dataset_size=n
    )


def test_a_branch_order_is_the_stream_from_the_fork_without_the_dropped_windows():
    from observatory.data import BranchOrder

    n, batch, fork, dropped = 10, 4, 3, [0, 7]
    stream = np.concatenate(
        [batch_indices(data_seed=5, step=k, batch_size=batch, dataset_size=n) for k in range(40)]
    )
    kept = stream[fork * batch :][~np.isin(stream[fork * batch :], dropped)]
    order = BranchOrder(data_seed=5, fork=fork, batch_size=batch, dataset_size=n, dropped=dropped)
    branch = np.concatenate([order.indices(k) for k in range(fork, fork + 20)])  # epochs cross
    assert np.array_equal(branch, kept[: branch.size])
    assert np.array_equal(order.indices(fork + 7), branch[7 * batch : 8 * batch])  # pure in k
    plain = BranchOrder(data_seed=5, fork=fork, batch_size=batch, dataset_size=n, dropped=[])
    assert np.array_equal(plain.indices(9), stream[9 * batch : 10 * batch])


def test_a_branch_of_a_branch_continues_its_parents_stream_where_the_parent_had_reached():
    from observatory.data import BranchOrder

    n, batch, fork, dropped = 10, 4, 3, [0, 7]
    order = BranchOrder(data_seed=5, fork=fork, batch_size=batch, dataset_size=n, dropped=dropped)
    stream = np.concatenate([order.indices(k) for k in range(fork, fork + 30)])
    for later in (fork, fork + 1, fork + 4, fork + 11):  # within the first epoch, and after
        entry = order.entry_at(later)
        epoch, offset = divmod(entry, n)
        raw = batch_indices(data_seed=5, step=epoch, batch_size=n, dataset_size=n)  # the epoch
        assert raw[offset] == stream[(later - fork) * batch]  # the window the batch starts at
        more = [0, 7, 2, 9]  # the parent's dropped windows and two more
        child = BranchOrder(
            data_seed=5, fork=later, batch_size=batch, dataset_size=n, dropped=more, start=entry
        )
        rest = stream[(later - fork) * batch :]
        kept = rest[~np.isin(rest, more)]
        got = np.concatenate([child.indices(k) for k in range(later, later + 10)])
        assert np.array_equal(got, kept[: got.size])
    assert list(order.dropped) == dropped
