"""MQAR recall benchmark: generator (mqar), models and state sizes (models), trainer (train), plot."""
