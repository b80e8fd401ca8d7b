"""Writing results safely: atomic publish of JSON, bytes and Zarr stores, file locks, one JSON sanitiser.

Every stage writes through here, so a killed run never leaves a half-written file under its final name."""
