"""Entry points and Dask orchestration for cmrprep (all file I/O lives here)."""
