"""Native code and its memory layout, behind checked wrappers: the C kernels (``_kernels.c``, wrapped by
``kernels``), the whitener layout they read (``layout``) and huge-page allocations (``hugepages``).

This package imports nothing from the rest of somad; the rest of somad reaches the C code only through
``kernels``, whose functions check what the C code trusts.
"""
