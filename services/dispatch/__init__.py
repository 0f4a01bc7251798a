"""The pool wire format: what goes to an expert pool and back, in both directions."""
