"""The autoscaler: the planner, two-phase rollout, the control loop and its actuators."""
