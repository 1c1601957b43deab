"""Prefect flows, one per stage (`flows/<stage>.py`), and the `rlhf` command line."""

import os

# Defaults for a machine without internet, set before Prefect, MLflow or HF libraries load;
# a user's own environment wins.
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Never a temporary server per process: stages share one (flows/infra/prefect_server.py).
    "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # One writer for MLflow's asynchronous logging (TRL's callback logs that way): steps reach
    # the store in the order they were logged. With its default pool of 10 a slow batch was
    # overtaken, and a stage killed then lost that step for good (a resumed run logs only the
    # steps after the last one its run has: tasks/tracking.py logged_until).
    "MLFLOW_ASYNC_LOGGING_THREADPOOL_SIZE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRL_EXPERIMENTAL_SILENCE": "1",  # SimPO's CPOTrainer is experimental; TRL is pinned
    "TOKENIZERS_PARALLELISM": "false",
    # Route our modules' and the trainers' logs through Prefect (UI + run logs).
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks,transformers,trl,datasets",
}.items():
    os.environ.setdefault(_key, _value)

import logging  # noqa: E402

logging.getLogger("tasks").setLevel(logging.INFO)  # progress lines of our own tasks
