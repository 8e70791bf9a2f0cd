"""Projections of the agent-state domain (conversations, continuations, sessions, jobs, flows)."""
