"""Offline evaluation: tasks, scoring, statistics and reports."""
