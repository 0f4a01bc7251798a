"""expertmesh services, as a ladder of packages: format <- math <- attention/expert <- gateway <- autoscaler <- cli."""
