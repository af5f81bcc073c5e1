"""Engine defaults shared by chat, serve and the batch engine (a light module: the CLI reads it)."""

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens read per step, so a long new prompt does not stall replies
SLOT_QUEUE = 4  # requests that may wait per slot when max_queue is not set
