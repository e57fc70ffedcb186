"""Criteria: versioned judge prompts, alignment sets and stored judgements (the api's side)."""
