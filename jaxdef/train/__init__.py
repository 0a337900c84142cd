"""The trainer: state, optimizer, the jitted adversarial step, the loop."""
