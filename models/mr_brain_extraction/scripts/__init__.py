"""Code of the mr_brain_extraction bundle that its configs cannot express."""
