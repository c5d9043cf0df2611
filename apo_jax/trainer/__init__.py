"""The trainer: the build boundary (config -> objects), the jitted step, the loop, evaluation."""
