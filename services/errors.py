"""Errors shared by every service. Each names what is wrong; services map them to status codes."""


class ExpertmeshError(Exception):
    """Base class for errors that carry a message fit for a user."""


class ConfigError(ExpertmeshError):
    """A config.json value that is missing, malformed or not supported. Names the key."""

    def __init__(self, key: str, message: str):
        self.key = key  # "" when the file as a whole is wrong (missing, not JSON)
        super().__init__(f"config.json: {key}: {message}" if key else f"config.json: {message}")


class CheckpointError(ExpertmeshError):
    """A checkpoint tensor that is missing or has the wrong shape or dtype. Names the tensor."""

    def __init__(self, tensor: str, message: str):
        self.tensor = tensor
        super().__init__(f"checkpoint tensor {tensor!r}: {message}")


class InvalidRequestError(ExpertmeshError):
    """A request that cannot be served as asked (bad token ids, empty prompt, too long); `param`: the request field
    at fault, where one is (the HTTP API's OpenAI error body names it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ExpertNotHeldError(ExpertmeshError):
    """A request names an expert that this pool does not hold (placement moved, or the caller is stale)."""


class PoolUnavailableError(ExpertmeshError):
    """An expert pool did not answer a dispatch (dead, unreachable, or past the call's deadline)."""

    def __init__(self, pool: str, detail: str):
        self.pool = pool
        super().__init__(f"expert pool {pool} unavailable: {detail}")


class CacheFullError(ExpertmeshError):
    """No free block is left in the latent cache for a sequence: the caller must wait or shed load."""


class QueueFullError(ExpertmeshError):
    """The gateway's waiting queue is at its limit: the client should retry later or elsewhere."""


class ServerStoppingError(ExpertmeshError):
    """The server is stopping and could not finish this call in its drain time."""
