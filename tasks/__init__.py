"""The work of each stage: Prefect tasks and the plain modules they use."""
