"""The domain-free training engine: launch, loop, loop state, optimizer set-up, random streams, checkpoints and
faults. It imports no text or image module; a domain plugs in through ``tdlm.engine.task.Task``."""
