"""blktap for Python: Xen's blktap2/tapdisk userspace disk stack."""

__version__ = "0.1.0"
