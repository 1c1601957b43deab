"""PPO components for the RLHF pipeline (pure-math losses live in ``losses.py``)."""
