"""Integrations with other inference stacks (vLLM)."""
