"""Batch inference from files: `eaas-jax batch`. Input lines and output
records (``formats``), the output file that a rerun resumes (``results``),
the run itself (``runner``)."""
