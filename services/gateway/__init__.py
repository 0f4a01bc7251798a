"""The gateway: front ends, the serving core (scheduler, runner, sampling), the model and remote experts."""
