"""Preference tuning of video diffusion transformers with Reg-DPO on GT-Pairs."""
