"""minirlhf: SFT, reward modelling, RLHF with PPO and DPO, from scratch, read beside the lecture."""
__version__ = "0.1.0"
