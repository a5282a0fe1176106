"""Work on dask.distributed: analysis jobs, in-process compute, verify, and the dask client.

- :mod:`~observatory.jobs.job_spec`: the analysis job spec (``analyses/*.toml``);
- :mod:`~observatory.jobs.resolve`: the analyses a job names, as workers resolve them;
- :mod:`~observatory.jobs.analyze`: running a job over checkpoints and seeds;
- :mod:`~observatory.jobs.compute`: one analysis in this process, nothing written;
- :mod:`~observatory.jobs.verify`: proving a store holds the checkpoints it claims;
- :mod:`~observatory.jobs.selection`: the runs of a store a command works on;
- :mod:`~observatory.jobs.cluster`: the dask client and its workers' set-up.

Nothing is imported here: a training worker imports :mod:`observatory.jobs.cluster` alone.
"""
