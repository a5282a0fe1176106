"""Analysis jobs on dask: the job spec, compute, verify, and the one dask client helper."""
