"""thinkrl: train language models to think at the token level with reinforcement learning."""

__version__ = "0.1.0"
