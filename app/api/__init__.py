"""The REST service (FastAPI): thin routes over plain data-access and pipeline functions."""
