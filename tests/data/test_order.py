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
