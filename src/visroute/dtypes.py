"""The dtypes visroute takes by name (`--dtype`, a grid's `dtype:`). Kept free of torch, so that the command line
lists them without importing it; `visroute.loading.DTYPES` maps them to torch's."""

DTYPE_NAMES = ("float32", "bfloat16", "float16")
