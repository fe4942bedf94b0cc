"""Reinforcement learning for the diffusion LM (issue 31): verifiable rewards, group-relative
advantages and diffu-GRPO's policy loss. The rollout engine is ``rnd1.generate``'s sampler."""
