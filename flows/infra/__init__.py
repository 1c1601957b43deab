"""How stages run, rather than what they compute: the `rlhf` command line, the shared Prefect
server and warm starts, `rlhf up`/`down`, the deployment backend and the hand-off to a worker
that shares no disk, and the helpers of the tests and benchmarks."""
