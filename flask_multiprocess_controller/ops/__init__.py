"""Operator tools: the `flask mpc` commands, the worker process and the dashboard."""
