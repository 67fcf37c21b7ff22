"""Optional integrations (Lightning, TensorBoard): each imported lazily, behind its extra."""
