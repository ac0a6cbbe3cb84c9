"""Three-stage RedOne 2.0 post-training of a domain LLM: DAPO, targeted SFT, DAPO."""
