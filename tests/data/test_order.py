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
