"""The hospital side: an agent that pulls tasks from the hub and runs them on local data.

Nothing is imported here on purpose: the task worker (``python -m laulima.site.worker``)
starts with every round and must not pay for the agent's HTTP and settings stack.
"""
